"""Which split categories each student experiment trains on, whether the unlabeled cases get pseudo-labels, and
the table of how many cases of each category every student uses (``results/split/students.tsv``).

Every student trains on the strong and weak cases. An experiment with ``unlabeled: true`` also trains on the
unlabeled cases, whose training label is their merged label: the teacher's pseudo-label after the merge's
confidence filter (there is no annotation to anchor it, so only merged labels can hold it). Unlabeled cases are
pseudo-labelled (and merged) when ``pseudo.include_unlabeled`` is true, or, when it is null (the default), as soon
as one experiment asks for them: asking for unlabeled cases is the user's intent, and a second switch that must
agree with it would only be a way to get it wrong. An explicit ``false`` next to such an experiment contradicts it
and stops planning with a message naming both keys.

The rule files compute the same categories with :func:`training_categories`, so the manifests, this table and the
merge's per-student table (:func:`workflow_scripts.labels.merge.student_table`) cannot disagree.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Mapping, Sequence

import pandas as pd

from ..io.volumes import write_text
from .split import CATEGORIES

ANNOTATED = ("strong", "weak")  # what every student trains on
SPLIT_ROW = "(split)"  # the table row of all accepted cases (parenthesised: no experiment name can take it)
PSEUDO_ROW = "(pseudo-labelled)"  # the row of the cases the teacher pseudo-labels


class StudentConfigError(ValueError):
    """The student experiments and the pseudo-label settings contradict each other (stops planning)."""


def training_categories(name: str, experiment: Mapping) -> tuple[str, ...]:
    """Split categories the experiment ``name`` trains on: strong and weak, plus unlabeled with ``unlabeled: true``.

    Raises :class:`StudentConfigError` for ``unlabeled: true`` with raw labels: an unlabeled case has no raw label,
    its only training label is the merged one.
    """
    if not experiment.get("unlabeled", False):
        return ANNOTATED
    if experiment["labels"] != "merged":
        raise StudentConfigError(
            f"student experiment {name!r}: unlabeled: true needs labels: merged (an unlabeled case has no raw "
            f"label; it trains on its merged label, the teacher's pseudo-label), got labels: {experiment['labels']}"
        )
    return (*ANNOTATED, "unlabeled")


def training_threads(experiment: Mapping, default: int) -> int:
    """CPU threads of the experiment's training job: its own ``threads``, else ``student.threads`` (``default``).

    Per experiment because students that train side by side with other jobs and one that trains alone want
    different shares of the cores: in the demo the baseline trains beside the teacher on one core each, while the
    two_stage student, which waits for the pseudo-labels, trains alone and can use both.
    """
    threads = experiment.get("threads")
    return default if threads is None else int(threads)


def pseudo_labels_unlabeled(include_unlabeled: bool | None, categories: Mapping[str, Sequence[str]]) -> bool:
    """Whether the unlabeled cases are pseudo-labelled and merged.

    ``include_unlabeled`` is ``pseudo.include_unlabeled``: true always, null when some experiment trains on them
    (``categories``: experiment -> its :func:`training_categories`), false never, which is an error when an
    experiment asks for them.
    """
    asking = sorted(name for name, cats in categories.items() if "unlabeled" in cats)
    if include_unlabeled is False and asking:
        raise StudentConfigError(
            f"student experiment(s) {', '.join(asking)} train on the unlabeled cases (unlabeled: true), but "
            "pseudo.include_unlabeled is false, so those cases get no pseudo-label: set pseudo.include_unlabeled to "
            "null (pseudo-label them when an experiment asks) or true, or remove unlabeled: true"
        )
    return bool(include_unlabeled) or bool(asking)


def student_counts(split: pd.DataFrame, experiments: Mapping[str, Mapping], pseudo_unlabeled: bool) -> pd.DataFrame:
    """Cases per category (columns ``strong``, ``weak``, ``unlabeled``, ``total``): one row for the split, one for
    the pseudo-labelled cases and one per experiment (with its ``model`` and ``labels``), in config order."""
    counts = split["category"].value_counts().reindex(CATEGORIES, fill_value=0).astype(int)

    def row(name: str, model: str, labels: str, categories: Sequence[str]) -> dict:
        used = {category: int(counts[category]) if category in categories else 0 for category in CATEGORIES}
        return {"experiment": name, "model": model, "labels": labels, **used, "total": sum(used.values())}

    pseudo = ("weak", "unlabeled") if pseudo_unlabeled else ("weak",)
    rows = [row(SPLIT_ROW, "", "", CATEGORIES), row(PSEUDO_ROW, "teacher", "", pseudo)]
    rows += [row(name, spec.get("model", "c2f"), spec["labels"], training_categories(name, spec))
             for name, spec in experiments.items()]
    return pd.DataFrame(rows, columns=["experiment", "model", "labels", *CATEGORIES, "total"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts.ingest.students",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", required=True, help="split/split.tsv (columns case, category)")
    parser.add_argument("--experiments", required=True, type=json.loads,
                        help="student.experiments as JSON ({name: {labels, model, unlabeled}})")
    parser.add_argument("--pseudo-unlabeled", action="store_true",
                        help="the unlabeled cases are pseudo-labelled (pseudo.include_unlabeled, resolved)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    try:
        table = student_counts(pd.read_csv(args.split, sep="\t", dtype=str), args.experiments, args.pseudo_unlabeled)
    except StudentConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for entry in table.itertuples(index=False):
        print(f"{entry.experiment}: {entry.strong} strong, {entry.weak} weak, {entry.unlabeled} unlabeled")
    write_text(args.output, table.to_csv(sep="\t", index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
