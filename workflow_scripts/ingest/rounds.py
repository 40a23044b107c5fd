"""Rounds of pseudo-labelling (README, "Rounds"; config section ``rounds``): which students a later round retrains,
who pseudo-labels it, its student settings, where its files live, and the columns of the table that compares rounds.

Round 1 is the paper (teacher -> pseudo-labels -> merge -> students) and keeps its paths; round k >= 2 lives under
``round<k>/``: the pseudo-labeller (a student experiment on merged labels) of round k - 1 pseudo-labels the weak
(and included unlabeled) cases, they are merged by the same rule, and the experiments on merged labels train again.
Pure functions: rules/rounds.smk and its tests call them.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence


class RoundsConfigError(ValueError):
    """A ``rounds`` setting that cannot work with the student experiments; raised while planning, before any job."""


def retrained_experiments(experiments: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The experiments a later round trains again: the c2f students on merged labels (config order). The ones on raw
    labels (the baseline) see the same labels in every round, so round 1's model stands for all rounds; nnU-Net
    students stay round 1 only (README, "Rounds")."""
    return [name for name, experiment in experiments.items()
            if experiment["labels"] == "merged" and experiment.get("model", "c2f") == "c2f"]


def check_rounds(rounds: Mapping[str, Any], retrained: Sequence[str], c2f: Mapping[str, Any]) -> None:
    """Stop planning on settings that cannot work: a pseudo-labeller that a later round does not retrain, or a
    student override that is no student.c2f setting. Nothing is checked for ``count: 1``, which plans no later round
    (so a config without a two_stage experiment still runs the paper's single round)."""
    if rounds["count"] < 2:
        return
    if rounds["pseudo_labeller"] not in retrained:
        raise RoundsConfigError(
            f"config rounds.pseudo_labeller {rounds['pseudo_labeller']!r} must be a c2f student experiment on merged"
            f" labels (student.experiments: {sorted(retrained)})")
    unknown = sorted(set(rounds["c2f"]) - set(c2f))
    if unknown:
        raise RoundsConfigError(f"config rounds.c2f sets {unknown}, which are not student.c2f settings")


def round_c2f(c2f: Mapping[str, Any], rounds: Mapping[str, Any], round_number: int) -> dict[str, Any]:
    """The c2f student settings of a round: student.c2f in round 1, with rounds.c2f's overrides in later rounds (so
    changing an override retrains later rounds only)."""
    return dict(c2f) if round_number == 1 else {**c2f, **rounds["c2f"]}


def round_folder(round_number: int) -> str:
    """The folder of a round's artifacts under the results folder: none for round 1, whose files keep the paths
    they had before rounds existed (so a finished run stays up to date), ``round<k>`` for later rounds."""
    if round_number < 1:
        raise ValueError(f"rounds count from 1, got {round_number}")
    return "" if round_number == 1 else f"round{round_number}"


def later_rounds(count: int) -> list[int]:
    """The round numbers that have their own folders: 2 .. count."""
    return list(range(2, count + 1))


def side_by_side(ablation: Sequence[str], retrained: Sequence[str], count: int) -> list[tuple[str, str, int]]:
    """Columns of the rounds table: (column name, experiment, round) for every eval.ablation entry, in its order; an
    experiment a later round retrains gets one column per round (``two_stage_round1``, ``two_stage_round2``, ...),
    the others (baseline, teacher) one column of their single model."""
    columns = []
    for experiment in ablation:
        if experiment in retrained:
            columns += [(f"{experiment}_round{k}", experiment, k) for k in range(1, count + 1)]
        else:
            columns.append((experiment, experiment, 1))
    return columns
