"""Rerunning parts of a finished run (README, "Rerunning stages"): a changed setting reruns exactly what depends on
it, --forcerun of one rule reruns only its jobs, and a deleted per-case output is rebuilt for that case alone.

Every test starts from a copy of one finished tiny run (the ``completed_run`` fixture of conftest.py, shared by all
test modules and xdist workers of a session), because a run from scratch
costs minutes. The run reads a raw dataset outside its working folder, as real data would be.
"""
from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from conftest import (
    artifact_states,
    changed_files,
    copy_run,
    executed_rules,
    output_of,
    planned_jobs,
    run_workflow,
    write_config,
)
from workflow_scripts.labels.pseudo import shard_cases
from workflow_scripts.io.volumes import Geometry

# The label merge's rules, and the stages before it that a merge setting must never rerun (with teacher_*, pseudo_*).
MERGE_RULES = {"merge_case", "merge_summary"}
UPSTREAM_OF_MERGE = {"demo_dataset", "qc_case", "qc_summary", "stats_case", "stats_aggregate", "split"}

@pytest.mark.slow
def test_finished_run_is_up_to_date(completed_run: Path, raw_config: Path, tmp_path: Path) -> None:
    """A copied finished run has nothing to do: the premise of every other rerun test."""
    workdir = copy_run(completed_run, tmp_path / "run")
    assert planned_jobs(workdir, raw_config) == Counter()


@pytest.mark.slow
def test_merge_setting_reruns_merge_and_downstream_only(
    completed_run: Path, raw_dataset: Path, tmp_path: Path
) -> None:
    workdir = copy_run(completed_run, tmp_path / "run")
    changed = write_config(tmp_path / "changed.yaml", raw_dataset, merge={"min_confidence": 0.5})
    jobs = planned_jobs(workdir, changed)
    assert MERGE_RULES | {"student_train", "evaluate_experiment"} <= set(jobs), jobs
    untouched = {rule for rule in jobs if rule.startswith(("teacher_", "pseudo_"))} | (UPSTREAM_OF_MERGE & set(jobs))
    assert not untouched, jobs
    # and for real, up to the merge: only merge jobs run, and the stricter threshold changes merged labels
    before = artifact_states(workdir / "results")
    ran = executed_rules(output_of(run_workflow(workdir, "--until", "merge_summary", config=changed)))
    assert set(ran) == MERGE_RULES, ran
    after = artifact_states(workdir / "results")
    assert after["merged/summary.tsv"][1] != before["merged/summary.tsv"][1]


@pytest.mark.slow
def test_including_unlabeled_cases_adds_their_pseudo_labels_only(
    completed_run: Path, raw_dataset: Path, tmp_path: Path
) -> None:
    """Weak and unlabeled cases are sharded separately: switching pseudo.include_unlabeled on plans pseudo-labels for
    the unlabeled cases and keeps every weak case's pseudo-label and the teacher."""
    workdir = copy_run(completed_run, tmp_path / "run")
    split = pd.read_csv(workdir / "results" / "split" / "split.tsv", sep="\t")
    unlabeled = split.loc[split["category"] == "unlabeled", "case"].tolist()
    assert unlabeled
    changed = write_config(tmp_path / "changed.yaml", raw_dataset, pseudo={"include_unlabeled": True})
    jobs = planned_jobs(workdir, changed)
    shard_size = yaml.safe_load(changed.read_text())["pseudo"]["shard_size"]
    assert jobs["pseudo_case"] == len(unlabeled), jobs
    assert jobs["pseudo_shard"] == len(shard_cases(unlabeled, shard_size)), jobs
    assert not any(rule.startswith("teacher_") for rule in jobs), jobs


@pytest.mark.slow
def test_unlabeled_cases_for_one_experiment_rerun_only_that_student(
    completed_run: Path, raw_dataset: Path, tmp_path: Path
) -> None:
    """README "Unlabeled cases": unlabeled: true on two_stage (pseudo.include_unlabeled left null) plans the unlabeled
    cases' pseudo-labels and merges and two_stage's training, and nothing of the teacher, of a weak or strong case
    or of the baseline student."""
    workdir = copy_run(completed_run, tmp_path / "run")
    split = pd.read_csv(workdir / "results" / "split" / "split.tsv", sep="\t")
    unlabeled = set(split.loc[split["category"] == "unlabeled", "case"])
    assert unlabeled
    changed = write_config(tmp_path / "changed.yaml", raw_dataset,
                           student={"experiments": {"two_stage": {"labels": "merged", "unlabeled": True}}})
    dry_run = output_of(run_workflow(workdir, "--dry-run", config=changed))
    jobs: dict[str, list[str]] = {}
    for rule, wildcards in re.findall(r"^(?:localrule|rule|checkpoint) (\w+):\n((?:    .*\n)*)", dry_run, re.M):
        found = re.search(r"wildcards: (.*)", wildcards)
        jobs.setdefault(rule, []).append(found[1] if found else "")
    assert {case.removeprefix("case=") for case in jobs.pop("pseudo_case")} == unlabeled, jobs
    assert {case.removeprefix("case=") for case in jobs.pop("merge_case")} == unlabeled, jobs
    shard_size = yaml.safe_load(changed.read_text())["pseudo"]["shard_size"]
    assert len(jobs.pop("pseudo_shard")) == len(shard_cases(sorted(unlabeled), shard_size)), jobs
    assert jobs["student_train"] == ["experiment=two_stage"], jobs
    assert not any(rule.startswith("teacher_") for rule in jobs), jobs
    assert not any("baseline" in w for wildcards in jobs.values() for w in wildcards), jobs
    assert not UPSTREAM_OF_MERGE & set(jobs), jobs


@pytest.mark.slow
def test_forcerun_label_statistics_reruns_only_them(completed_run: Path, raw_config: Path, tmp_path: Path) -> None:
    workdir = copy_run(completed_run, tmp_path / "run")
    before = artifact_states(workdir / "results")
    proc = run_workflow(workdir, "--forcerun", "stats_case", "stats_aggregate", "--until", "stats_aggregate",
                        config=raw_config)
    ran = executed_rules(output_of(proc))
    assert set(ran) == {"stats_case", "stats_aggregate"}, ran
    rewritten = changed_files(before, artifact_states(workdir / "results"))
    assert rewritten and all(path.startswith("stats/") for path in rewritten), rewritten
    # statistics are a pure function of the labels: rerunning them gives the same tables
    after = artifact_states(workdir / "results")
    assert all(after[p][1] == before[p][1] for p in rewritten if p.endswith(".tsv")), rewritten


@pytest.mark.slow
def test_deleted_pseudo_label_regenerates_that_case_only(
    completed_run: Path, raw_config: Path, tmp_path: Path
) -> None:
    workdir = copy_run(completed_run, tmp_path / "run")
    pseudo = sorted((workdir / "results" / "pseudo").glob("*_confidence.nii.gz"))
    assert len(pseudo) > 1
    case = pseudo[0].name.removesuffix("_confidence.nii.gz")
    label = f"results/pseudo/{case}.nii.gz"
    (workdir / label).unlink()
    # Snakemake leaves a missing intermediate file alone while everything built from it is up to date (as for temp
    # files), so the README names the file to rebuild
    assert planned_jobs(workdir, raw_config) == Counter()
    before = artifact_states(workdir / "results")
    proc = run_workflow(workdir, "--until", "merge_summary", "--forcerun", label, config=raw_config)
    assert executed_rules(output_of(proc)) == Counter({"pseudo_case": 1, "merge_case": 1, "merge_summary": 1})
    rewritten = changed_files(before, artifact_states(workdir / "results"))
    assert f"pseudo/{case}.nii.gz" in rewritten
    assert rewritten - {"merged/summary.tsv"} == {path for path in rewritten if Path(path).name.startswith(case)}


def add_class_box(label_file: Path, label: int) -> None:
    """Annotate a small box of background voxels as ``label`` (an annotator adding a class to a partial label)."""
    image = sitk.ReadImage(str(label_file))
    array = sitk.GetArrayFromImage(image)
    box = tuple(slice(size // 2 - 1, size // 2 + 1) for size in array.shape)
    array[box] = np.where(array[box] == 0, label, array[box])
    edited = sitk.GetImageFromArray(array)
    edited.CopyInformation(image)
    sitk.WriteImage(edited, str(label_file), useCompression=True)


@pytest.mark.slow
def test_teacher_and_pseudo_labels_then_new_and_edited_weak_cases(raw_dataset: Path, tmp_path: Path) -> None:
    """Teacher (validation table, test predictions), pseudo-labels and merge end to end; then README "After adding
    cases or editing labels": with the split brought up to date first, an edited weak label and a new weak case
    rerun the merge of those two cases and the pseudo-label of the new one; the teacher (its strong cases are
    unchanged) and every other pseudo-label are kept. One case per pseudo shard, so positional shards would rerun
    every case after the new one. (One test, so the suite trains this tiny teacher once.)"""
    raw = tmp_path / "raw"
    shutil.copytree(raw_dataset, raw)
    config = write_config(tmp_path / "config.yaml", raw, pseudo={"shard_size": 1})
    workdir = tmp_path / "run"
    run_workflow(workdir, "results/merged/summary.tsv", "results/teacher/validation.tsv",
                 "results/teacher/pred/efficiency/0000.tsv", config=config)
    validation = pd.read_csv(workdir / "results" / "teacher" / "validation.tsv", sep="\t")
    assert validation["class_id"].tolist() == list(range(1, 14)) + [0]
    assert validation["dice"].between(0, 1).all()
    split = pd.read_csv(workdir / "results" / "split" / "split.tsv", sep="\t", dtype={"classes": str})
    weak = split[split["category"] == "weak"].assign(n=lambda t: t["classes"].str.count(",") + 1)
    for case in weak["case"]:
        image = sitk.ReadImage(str(raw / "imagesTr" / f"{case}_0000.nii.gz"))
        for name in (f"{case}.nii.gz", f"{case}_confidence.nii.gz"):
            written = sitk.ReadImage(str(workdir / "results" / "pseudo" / name))
            assert written.GetPixelID() == sitk.sitkUInt8 and Geometry.of(written) == Geometry.of(image)
    edited, classes = weak.sort_values("n").iloc[0][["case", "classes"]]
    new_class = min(set(range(1, 14)) - {int(c) for c in classes.split(",")})
    add_class_box(raw / "labelsTr" / f"{edited}.nii.gz", new_class)
    first = sorted(weak["case"])[0]
    added = f"{first}a"  # sorts right after the first weak case, before all the others
    shutil.copy(raw / "imagesTr" / f"{first}_0000.nii.gz", raw / "imagesTr" / f"{added}_0000.nii.gz")
    shutil.copy(raw / "labelsTr" / f"{first}.nii.gz", raw / "labelsTr" / f"{added}.nii.gz")
    before = artifact_states(workdir / "results")

    ran = executed_rules(output_of(run_workflow(workdir, "--until", "split", config=config)))
    assert ran == Counter({"qc_case": 2, "stats_case": 2, "qc_summary": 1, "stats_aggregate": 1, "split": 1}), ran
    split = pd.read_csv(workdir / "results" / "split" / "split.tsv", sep="\t", dtype={"classes": str}).set_index("case")
    assert split.loc[added, "category"] == "weak"
    assert split.loc[edited, "category"] == "weak" and str(new_class) in split.loc[edited, "classes"].split(",")

    ran = executed_rules(output_of(run_workflow(workdir, "--until", "merge_summary", config=config)))
    assert ran == Counter({"pseudo_shard": 1, "pseudo_case": 1, "merge_case": 2, "merge_summary": 1}), ran
    rewritten = changed_files(before, artifact_states(workdir / "results"))
    assert not any(path.startswith("teacher/") for path in rewritten), rewritten
    pseudo = {path for path in rewritten if path.startswith("pseudo/")}
    assert {f"pseudo/{added}.nii.gz", f"pseudo/{added}_confidence.nii.gz"} <= pseudo
    assert all(path.startswith((f"pseudo/shards/{added}/", f"pseudo/{added}")) for path in pseudo), pseudo
    assert {f"merged/{edited}.nii.gz", f"merged/{added}.nii.gz"} <= rewritten
    merged_label = sitk.GetArrayFromImage(sitk.ReadImage(str(workdir / "results" / "merged" / f"{edited}.nii.gz")))
    assert (merged_label == new_class).any()
