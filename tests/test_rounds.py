"""Rounds of pseudo-labelling (README, "Rounds"): which students a later round retrains and with what, where its
files live, the rounds table's columns, and on a copy of the finished tiny run (``completed_run``): ``count: 2``
plans round 2's jobs and nothing of round 1, round-2 settings change nothing while ``count`` is 1, a tiny second
round runs end to end without rewriting a round-1 artifact, and a change of a round-2 setting (or a third round)
reruns only round 2 (or adds only round 3)."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from conftest import (
    TINY_CONFIG,
    artifact_states,
    changed_files,
    copy_run,
    executed_rules,
    output_of,
    planned_jobs,
    run_workflow,
    write_config,
)
from workflow_scripts.ingest.rounds import (
    RoundsConfigError,
    check_rounds,
    later_rounds,
    retrained_experiments,
    round_c2f,
    round_folder,
    side_by_side,
)
from workflow_scripts.labels.pseudo import shard_cases
from workflow_scripts.io.volumes import Geometry

EXPERIMENTS = {"two_stage": {"labels": "merged", "model": "c2f"}, "baseline": {"labels": "raw", "model": "c2f"},
               "all": {"labels": "merged", "unlabeled": True}, "nn": {"labels": "merged", "model": "nnunet"}}
ROUNDS = {"count": 2, "pseudo_labeller": "two_stage", "fill_classes": None, "c2f": {}}


# --- pure functions ----------------------------------------------------------------------------------------------

def test_later_rounds_retrain_the_c2f_students_on_merged_labels_only() -> None:
    assert retrained_experiments(EXPERIMENTS) == ["two_stage", "all"]


def test_settings_that_cannot_work_stop_planning_but_only_when_there_is_a_later_round() -> None:
    c2f = {"epochs": 3, "lr": 0.01}
    check_rounds(ROUNDS, ["two_stage"], c2f)
    with pytest.raises(RoundsConfigError, match=r"pseudo_labeller 'baseline' must be a c2f student experiment on"
                                                r" merged labels \(student.experiments: \['two_stage'\]\)"):
        check_rounds({**ROUNDS, "pseudo_labeller": "baseline"}, ["two_stage"], c2f)
    with pytest.raises(RoundsConfigError, match=r"rounds.c2f sets \['epoch'\], which are not student.c2f settings"):
        check_rounds({**ROUNDS, "c2f": {"epoch": 5}}, ["two_stage"], c2f)
    check_rounds({**ROUNDS, "count": 1, "pseudo_labeller": "baseline"}, [], c2f)  # the paper: nothing to check


def test_round_settings_override_the_student_only_after_round_one() -> None:
    c2f = {"epochs": 3, "lr": 0.01}
    rounds = {**ROUNDS, "c2f": {"epochs": 7}}
    assert round_c2f(c2f, rounds, 1) == c2f
    assert round_c2f(c2f, rounds, 2) == round_c2f(c2f, rounds, 3) == {"epochs": 7, "lr": 0.01}


def test_round_one_keeps_its_paths_and_later_rounds_get_their_folders() -> None:
    assert round_folder(1) == "" and round_folder(2) == "round2" and round_folder(12) == "round12"
    with pytest.raises(ValueError):
        round_folder(0)
    assert later_rounds(1) == [] and later_rounds(3) == [2, 3]


def test_rounds_table_has_every_round_of_the_retrained_students_next_to_the_others() -> None:
    assert side_by_side(["baseline", "teacher", "two_stage"], ["two_stage"], 3) == [
        ("baseline", "baseline", 1), ("teacher", "teacher", 1), ("two_stage_round1", "two_stage", 1),
        ("two_stage_round2", "two_stage", 2), ("two_stage_round3", "two_stage", 3)]


def test_planning_stops_on_a_later_round_student_setting_round_one_would_reject(tmp_path: Path) -> None:
    """rounds.c2f is a free object in the schema: its values are validated as student.c2f's, before any job."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: {count: 2, c2f: {epochs: 0}}\n")
    proc = run_workflow(tmp_path / "run", "--dry-run", "--configfile", str(TINY_CONFIG), str(bad), check=False)
    assert proc.returncode != 0
    assert re.search(r"config rounds.c2f: .*0 is less than the minimum of 1", output_of(proc), re.S), output_of(proc)


# --- the workflow on a copy of the finished tiny run ------------------------------------------------------------

def round_jobs(split: pd.DataFrame, shard_size: int) -> Counter:
    """The jobs of one later round on the tiny run: the weak cases' pseudo shards and cases, every strong and weak
    case's merge, two_stage's training, its test prediction and scoring, and the rounds table."""
    weak = split.loc[split["category"] == "weak", "case"].tolist()
    merged = split.loc[split["category"].isin(["strong", "weak"]), "case"].tolist()
    return Counter({"round_pseudo_shard": len(shard_cases(weak, shard_size)), "round_pseudo_case": len(weak),
                    "round_merge_case": len(merged), "round_merge_summary": 1, "round_student_manifest": 1,
                    "round_student_train": 1, "round_student_predict_0000": 1, "round_evaluate": 1,
                    "rounds_table": 1, "all": 1})


@pytest.mark.slow
def test_two_rounds_plan_round_two_only_and_round_settings_leave_round_one_alone(
        completed_run: Path, raw_dataset: Path, tmp_path: Path) -> None:
    workdir = copy_run(completed_run, tmp_path / "run")
    split = pd.read_csv(workdir / "results" / "split" / "split.tsv", sep="\t")
    # round-2 settings while there is one round: the paper's run stays up to date
    one = write_config(tmp_path / "one.yaml", raw_dataset,
                       rounds={"count": 1, "fill_classes": [1, 2, 14], "c2f": {"epochs": 1}})
    assert planned_jobs(workdir, one) == Counter()
    two = write_config(tmp_path / "two.yaml", raw_dataset, rounds={"count": 2})
    assert planned_jobs(workdir, two) == round_jobs(split, 4)


@pytest.mark.slow
def test_a_tiny_second_round_end_to_end_then_its_settings_rerun_only_it(
        completed_run: Path, raw_dataset: Path, tmp_path: Path) -> None:
    workdir = copy_run(completed_run, tmp_path / "run")
    results = workdir / "results"
    split = pd.read_csv(results / "split" / "split.tsv", sep="\t", dtype={"classes": str})
    before = artifact_states(results)
    two = write_config(tmp_path / "two.yaml", raw_dataset, rounds={"count": 2})
    ran = executed_rules(output_of(run_workflow(workdir, config=two)))
    assert ran == round_jobs(split, 4), ran
    rewritten = changed_files(before, artifact_states(results))
    assert all(path.startswith("round2/") or path == "eval/rounds.tsv" for path in rewritten), rewritten

    # round 2's pseudo-labels are the round-1 two_stage student's, with confidence maps in the input's geometry, and
    # the merge keeps every annotated voxel of the weak labels
    for case, classes in split.loc[split["category"] == "weak", ["case", "classes"]].itertuples(index=False):
        image = sitk.ReadImage(str(raw_dataset / "imagesTr" / f"{case}_0000.nii.gz"))
        for name in (f"{case}.nii.gz", f"{case}_confidence.nii.gz"):
            written = sitk.ReadImage(str(results / "round2" / "pseudo" / name))
            assert written.GetPixelID() == sitk.sitkUInt8 and Geometry.of(written) == Geometry.of(image)
        weak = sitk.GetArrayFromImage(sitk.ReadImage(str(raw_dataset / "labelsTr" / f"{case}.nii.gz")))
        merged = sitk.GetArrayFromImage(sitk.ReadImage(str(results / "round2" / "merged" / f"{case}.nii.gz")))
        np.testing.assert_array_equal(merged[weak > 0], weak[weak > 0])
        filled = set(np.unique(merged[weak == 0])) - {0}
        assert not filled & {int(c) for c in classes.split(",")} and 14 not in filled  # the lesion is never filled
    table = pd.read_csv(results / "eval" / "rounds.tsv", sep="\t")
    assert [c.removesuffix("_DSC") for c in table.columns if c.endswith("_DSC")] == [
        "baseline", "teacher", "two_stage_round1", "two_stage_round2"]
    round1 = pd.read_csv(results / "eval" / "two_stage" / "summary.tsv", sep="\t")
    np.testing.assert_allclose(table["two_stage_round1_DSC"], round1["DSC_mean"], atol=1e-4)

    # a round-2 student setting retrains round 2's student only; a third round adds round 3's jobs only
    epochs = write_config(tmp_path / "epochs.yaml", raw_dataset, rounds={"count": 2, "c2f": {"epochs": 2}})
    assert planned_jobs(workdir, epochs) == Counter({"round_student_train": 1, "round_student_predict_0000": 1,
                                                     "round_evaluate": 1, "rounds_table": 1, "all": 1})
    three = write_config(tmp_path / "three.yaml", raw_dataset, rounds={"count": 3})
    assert planned_jobs(workdir, three) == round_jobs(split, 4)
