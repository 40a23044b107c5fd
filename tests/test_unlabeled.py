"""Unlabeled cases in student training (README, "Unlabeled cases"): which categories an experiment trains on, when
the unlabeled cases are pseudo-labelled, their own merge settings, the per-student counts, the c2f validation split,
and the real rules (split, merge and both students' manifests) in a minimal workflow: the unlabeled cases reach
only the asking experiment's manifest, the ignore label reaches the c2f loss and the nnU-Net dataset, and nothing
else is planned again."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
import yaml
from snakemake.utils import validate

from conftest import REPO
from workflow_scripts.c2f import train as train_mod
from workflow_scripts.c2f.data import IGNORE_INDEX
from workflow_scripts.c2f.model import StudentSpec
from workflow_scripts.ingest.students import (
    PSEUDO_ROW,
    SPLIT_ROW,
    StudentConfigError,
    pseudo_labels_unlabeled,
    student_counts,
    training_categories,
    training_threads,
)
from workflow_scripts.io.manifest import TrainingCase, read_manifest, write_manifest
from workflow_scripts.labels.merge import category_settings, student_table
from workflow_scripts.nnunet.student import student_model_folder, uses_ignore_label
from workflow_scripts.nnunet.training import fold_name

MERGED = {"labels": "merged", "model": "c2f"}
RAW = {"labels": "raw", "model": "c2f"}


# --- which cases a student trains on ----------------------------------------------------------------------------

def test_experiments_train_on_unlabeled_cases_only_when_asked_and_only_on_merged_labels() -> None:
    assert training_categories("two_stage", MERGED) == ("strong", "weak")
    assert training_categories("two_stage", {**MERGED, "unlabeled": False}) == ("strong", "weak")
    assert training_categories("all", {**MERGED, "unlabeled": True}) == ("strong", "weak", "unlabeled")
    with pytest.raises(StudentConfigError, match=r"'baseline': unlabeled: true needs labels: merged.*labels: raw"):
        training_categories("baseline", {**RAW, "unlabeled": True})


def test_an_experiment_trains_with_its_own_threads_else_with_student_threads() -> None:
    assert training_threads(MERGED, 1) == 1
    assert training_threads({**MERGED, "threads": None}, 3) == 3
    assert training_threads({**MERGED, "threads": 2}, 1) == 2


def test_unlabeled_cases_are_pseudo_labelled_when_an_experiment_asks_unless_switched_off() -> None:
    none = {"two_stage": ("strong", "weak")}
    asking = {**none, "all": ("strong", "weak", "unlabeled")}
    assert pseudo_labels_unlabeled(None, none) is False
    assert pseudo_labels_unlabeled(None, asking) is True  # the default switches them on for the asking experiment
    assert pseudo_labels_unlabeled(True, none) is True
    assert pseudo_labels_unlabeled(False, none) is False
    with pytest.raises(StudentConfigError, match=r"experiment\(s\) all train on the unlabeled cases.*"
                                                 r"pseudo.include_unlabeled is false"):
        pseudo_labels_unlabeled(False, asking)


def test_split_counts_say_how_many_cases_of_each_category_every_student_uses() -> None:
    split = pd.DataFrame({"case": list("abcdef"),
                          "category": ["strong", "weak", "weak", "unlabeled", "unlabeled", "unlabeled"]})
    experiments = {"two_stage": MERGED, "baseline": RAW, "all": {**MERGED, "unlabeled": True},
                   "nn": {"labels": "merged", "model": "nnunet", "unlabeled": True}}
    table = student_counts(split, experiments, pseudo_unlabeled=True).set_index("experiment")
    assert list(table.index) == [SPLIT_ROW, PSEUDO_ROW, "two_stage", "baseline", "all", "nn"]
    assert table.loc[SPLIT_ROW, ["strong", "weak", "unlabeled", "total"]].tolist() == [1, 2, 3, 6]
    assert table.loc[PSEUDO_ROW, ["strong", "weak", "unlabeled"]].tolist() == [0, 2, 3]
    assert table.loc["two_stage", ["strong", "weak", "unlabeled", "total"]].tolist() == [1, 2, 0, 3]
    assert table.loc["all", ["unlabeled", "total"]].tolist() == [3, 6]
    assert table.loc["nn", ["model", "labels", "unlabeled"]].tolist() == ["nnunet", "merged", 3]
    without = student_counts(split, {"two_stage": MERGED}, pseudo_unlabeled=False).set_index("experiment")
    assert without.loc[PSEUDO_ROW, "unlabeled"] == 0


def test_unlabeled_cases_have_their_own_confidence_filter_and_the_others_keep_theirs() -> None:
    merge = {"min_confidence": 0.0, "low_confidence_as": "background", "unlabeled_min_confidence": None,
             "unlabeled_low_confidence_as": None}
    for category in ("strong", "weak", "unlabeled"):  # null: the same settings for every case
        assert category_settings(merge, category) == (0.0, "background")
    own = {**merge, "unlabeled_min_confidence": 0.8, "unlabeled_low_confidence_as": "ignore"}
    assert category_settings(own, "unlabeled") == (0.8, "ignore")
    assert category_settings(own, "weak") == category_settings(own, "strong") == (0.0, "background")


def test_merge_summary_per_student_counts_the_unlabeled_cases_and_their_ignored_voxels() -> None:
    summary = pd.DataFrame({
        "case": ["s", "w", "u1", "u2"], "category": ["strong", "weak", "unlabeled", "unlabeled"],
        "filled_total": [0, 10, 20, 30], "low_confidence_voxels": [0, 1, 2, 3], "ignored_voxels": [0, 0, 2, 3]})
    table = student_table(summary, {"two_stage": ["strong", "weak"], "all": ["strong", "weak", "unlabeled"]})
    table = table.set_index("experiment")
    assert table.loc["two_stage", ["strong", "weak", "unlabeled"]].tolist() == [1, 1, 0]
    assert table.loc["two_stage", ["unlabeled_filled_voxels", "unlabeled_ignored_voxels"]].tolist() == [0, 0]
    assert table.loc["all", ["strong", "weak", "unlabeled"]].tolist() == [1, 1, 2]
    assert table.loc["all", ["weak_filled_voxels", "unlabeled_filled_voxels", "unlabeled_low_confidence_voxels",
                             "unlabeled_ignored_voxels"]].tolist() == [10, 50, 5, 5]


def test_nnunet_declares_the_ignore_label_when_any_category_it_trains_on_writes_it() -> None:
    assert uses_ignore_label("merged", ["background", "ignore"])  # weak: background, unlabeled: ignore
    assert not uses_ignore_label("merged", ["background"])
    assert not uses_ignore_label("raw", ["ignore"])


def test_manifest_keeps_the_split_category_and_reads_tables_without_one(tmp_path: Path) -> None:
    write_manifest(tmp_path / "m.tsv", ["0001", "u"], ["i1", "iu"], ["l1", "lu"], ["weak", "unlabeled"])
    cases = read_manifest(tmp_path / "m.tsv")
    assert cases == [TrainingCase("0001", "i1", "l1", "weak"), TrainingCase("u", "iu", "lu", "unlabeled")]
    assert [c.unlabeled for c in cases] == [False, True]
    write_manifest(tmp_path / "plain.tsv", ["a"], ["ia"], ["la"])
    assert read_manifest(tmp_path / "plain.tsv") == [TrainingCase("a", "ia", "la")]
    with pytest.raises(ValueError, match="lengths differ"):
        write_manifest(tmp_path / "bad.tsv", ["a"], ["ia"], ["la"], ["weak", "weak"])


def test_c2f_validates_on_annotated_cases_only_and_keeps_their_split() -> None:
    annotated = [TrainingCase(f"a{i}", "i", "l", "weak") for i in range(10)]
    unlabeled = [TrainingCase(f"u{i}", "i", "l", "unlabeled") for i in range(6)]
    mixed = [case for pair in zip(annotated, unlabeled + [None] * 4) for case in pair if case is not None]
    train_idx, val_idx = train_mod.split_cases(mixed, 0.2, 3)
    assert val_idx and not any(mixed[i].unlabeled for i in val_idx)
    assert sorted(train_idx + val_idx) == list(range(len(mixed)))
    # the annotated cases are split as they would be without any unlabeled case: the learning curve stays comparable
    _, alone = train_mod.split_cases(annotated, 0.2, 3)
    assert [mixed[i].case for i in val_idx] == [annotated[i].case for i in alone]
    assert train_mod.split_cases(annotated, 0.2, 3) == train_mod.split_validation(10, 0.2, 3)


# --- the real rules in a minimal workflow ------------------------------------------------------------------------

HARNESS = f"""
from snakemake.utils import validate

configfile: "config.yaml"
validate(config, schema={str(REPO / "config" / "schema.yaml")!r})

include: {str(REPO / "rules" / "common.smk")!r}

wildcard_constraints:
    case=CASE_ID,
    experiment="[A-Za-z0-9_]+",

include: {str(REPO / "rules" / "split.smk")!r}
include: {str(REPO / "rules" / "merge.smk")!r}
include: {str(REPO / "rules" / "student.smk")!r}
include: {str(REPO / "rules" / "student_nnunet.smk")!r}
"""
LABELS = [{"id": 1, "name": "Liver", "kind": "organ"}, {"id": 2, "name": "Spleen", "kind": "organ"},
          {"id": 3, "name": "Lesion", "kind": "lesion"}]
IGNORE = 4
SHAPE = (8, 12, 12)
NNUNET_DATASET = "results/student/nn/nnunet/raw/Dataset902_nn/dataset.json"
TARGETS = ["results/split/students.tsv", "results/merged/summary.tsv", "results/merged/students.tsv",
           "results/student/two_stage/train_cases.tsv", "results/student/baseline/train_cases.tsv",
           "results/student/nn/nnunet/train_cases.tsv", NNUNET_DATASET]


def write(path: Path, array: np.ndarray) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.5, 1.5, 3.0))
    sitk.WriteImage(image, str(path), useCompression=True)


def dataset(tmp_path: Path) -> dict[str, np.ndarray]:
    """Three cases as QC and statistics would leave them: strong s1, weak w1 (no spleen), unlabeled u1 (no label
    file), with the teacher's pseudo-labels and confidence maps of w1 and u1 in results/pseudo/."""
    rng = np.random.default_rng(3)
    data = tmp_path / "data"
    for name in ("images", "labels", "test_images", "test_labels"):
        (data / name).mkdir(parents=True)
    organs = np.zeros(SHAPE, np.uint8)
    organs[2:6, 1:6, 1:6], organs[2:6, 6:11, 6:11] = 1, 2
    labels = {"s1": organs, "w1": np.where(organs == 1, 1, 0).astype(np.uint8), "u1": None}
    for case, label in labels.items():
        write(data / "images" / f"{case}_0000.nii.gz", (rng.normal(0, 20, SHAPE) + 100 * organs).astype(np.int16))
        if label is not None:
            write(data / "labels" / f"{case}.nii.gz", label)
    pseudo = tmp_path / "results" / "pseudo"
    pseudo.mkdir(parents=True)
    confidence = np.where(np.arange(SHAPE[2]) % 2 == 0, 255, 60).astype(np.uint8) * np.ones(SHAPE, np.uint8)
    for case in ("w1", "u1"):
        write(pseudo / f"{case}.nii.gz", organs)
        write(pseudo / f"{case}_confidence.nii.gz", confidence)
    for folder, name, table in [
        ("qc", "accepted.tsv", {"case": ["s1", "w1", "u1"], "has_label": [True, True, False]}),
        ("stats", "label_stats.tsv", {"case": ["s1", "s1", "w1"], "class_id": [1, 2, 1], "voxels": [100, 100, 100]}),
    ]:
        (tmp_path / "results" / folder).mkdir(parents=True, exist_ok=True)
        pd.DataFrame(table).to_csv(tmp_path / "results" / folder / name, sep="\t", index=False)
    return {"organs": organs, "confidence": confidence}


def configure(tmp_path: Path, two_stage: bool = False, nn: bool = False, include_unlabeled=None,
              baseline: bool = False, threads: dict[str, int] | None = None) -> None:
    """The harness config: unlabeled: true on the named experiments; weak cases merged as the paper does (no
    confidence filter), unlabeled cases with their own filter (below 0.5 -> the ignore label); ``threads``: the
    experiments' own training threads (student.threads is 1)."""
    config = {
        "demo": {"enabled": False},
        "data": {name: str(tmp_path / "data" / name) for name in ("images", "labels", "test_images", "test_labels")},
        "labels": LABELS,
        "split": {"strong_requires": [1, 2]},
        "teacher": {"classes": [1, 2]},
        "pseudo": {"include_unlabeled": include_unlabeled},
        "merge": {"min_confidence": 0.0, "low_confidence_as": "background", "unlabeled_min_confidence": 0.5,
                  "unlabeled_low_confidence_as": "ignore", "mem_mb": 500, "runtime": 2},
        "student": {"experiments": {"two_stage": {**MERGED, "unlabeled": two_stage},
                                    "baseline": {**RAW, "unlabeled": baseline},
                                    "nn": {"labels": "merged", "model": "nnunet", "unlabeled": nn}},
                    "threads": 1, "mem_mb": 500, "predict_mem_mb": 500},
    }
    for name, count in (threads or {}).items():
        config["student"]["experiments"][name]["threads"] = count
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "Snakefile").write_text(HARNESS)


def snakemake(tmp_path: Path, *args: str, targets: list[str] = TARGETS, check: bool = True
              ) -> subprocess.CompletedProcess:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--directory", str(tmp_path),
                           "--snakefile", str(tmp_path / "Snakefile"), *targets, *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 or not check, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def job_blocks(dry_run: str):
    """(rule, text) of each planned job of a dry run."""
    for block in re.split(r"\n(?=(?:localrule|rule|checkpoint) \w+:)", dry_run):
        match = re.match(r"(?:localrule|rule|checkpoint) (\w+):", block)
        if match:
            yield match[1], block


def planned(dry_run: str) -> dict[str, list[str]]:
    """Planned jobs of a dry run: rule -> the wildcards of each job ("" for a job without wildcards)."""
    jobs: dict[str, list[str]] = {}
    for rule, block in job_blocks(dry_run):
        wildcards = re.search(r"wildcards: (.*)", block)
        jobs.setdefault(rule, []).append(wildcards[1] if wildcards else "")
    return jobs


def planned_threads(dry_run: str) -> dict[str, int]:
    """Threads of each planned job of a dry run, keyed "rule wildcards" (Snakemake prints them only above 1)."""
    threads = {}
    for rule, block in job_blocks(dry_run):
        wildcards, count = re.search(r"wildcards: (.*)", block), re.search(r"threads: (\d+)", block)
        threads[f"{rule} {wildcards[1] if wildcards else ''}"] = int(count[1]) if count else 1
    return threads


def manifest_cases(tmp_path: Path, experiment_manifest: str) -> dict[str, str]:
    return {c.case: c.category for c in read_manifest(tmp_path / experiment_manifest)}


@pytest.mark.slow  # a dozen Snakemake runs and a c2f training step: about a minute
def test_unlabeled_cases_reach_only_the_asking_students_with_the_ignore_label_in_their_loss(
        tmp_path: Path, monkeypatch) -> None:
    arrays = dataset(tmp_path)
    configure(tmp_path)
    snakemake(tmp_path)
    for manifest in ("results/student/two_stage/train_cases.tsv", "results/student/baseline/train_cases.tsv",
                     "results/student/nn/nnunet/train_cases.tsv"):
        assert manifest_cases(tmp_path, manifest) == {"s1": "strong", "w1": "weak"}
    assert not (tmp_path / "results" / "merged" / "u1.nii.gz").exists()  # nobody asked: not even merged
    assert "ignore" not in json.loads((tmp_path / NNUNET_DATASET).read_text())["labels"]

    # switched on for two_stage alone: only its manifest and the unlabeled case's merge are planned, with the
    # tables that count them; the split, the weak and strong merges and the other students stay as they are
    configure(tmp_path, two_stage=True)
    jobs = planned(snakemake(tmp_path, "--dry-run", "--printshellcmds").stdout)
    assert jobs.pop("merge_case") == ["case=u1"], jobs
    assert jobs.pop("student_manifest") == ["experiment=two_stage"], jobs
    assert set(jobs) == {"merge_summary", "merge_students", "split_students"}, jobs
    snakemake(tmp_path)
    assert manifest_cases(tmp_path, "results/student/two_stage/train_cases.tsv") == {
        "s1": "strong", "w1": "weak", "u1": "unlabeled"}
    for manifest in ("results/student/baseline/train_cases.tsv", "results/student/nn/nnunet/train_cases.tsv"):
        assert "u1" not in manifest_cases(tmp_path, manifest)
    # the unlabeled case's own filter: its uncertain pseudo voxels are the ignore label, the weak case has none
    merged_u1 = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "results/merged/u1.nii.gz")))
    uncertain = (arrays["organs"] > 0) & (arrays["confidence"] < 128)
    np.testing.assert_array_equal(merged_u1, np.where(uncertain, IGNORE, arrays["organs"]))
    assert IGNORE not in sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "results/merged/w1.nii.gz")))
    counts = pd.read_csv(tmp_path / "results/split/students.tsv", sep="\t").set_index("experiment")
    assert counts["unlabeled"].to_dict() == {SPLIT_ROW: 1, PSEUDO_ROW: 1, "two_stage": 1, "baseline": 0, "nn": 0}
    students = pd.read_csv(tmp_path / "results/merged/students.tsv", sep="\t").set_index("experiment")
    assert students["unlabeled"].to_dict() == {"two_stage": 1, "nn": 0}
    assert students.loc["two_stage", "unlabeled_ignored_voxels"] == np.count_nonzero(uncertain) > 0

    # the c2f trainer gets the ignore label of the unlabeled case and hands it to the loss as the ignored index
    dry_run = snakemake(tmp_path, "--dry-run", "--printshellcmds",
                        targets=["results/student/two_stage/model/model_final.pt"]).stdout
    command = next(line for line in dry_run.splitlines() if "workflow_scripts.c2f.train" in line)
    assert f"--ignore-label {IGNORE}" in command
    monkeypatch.chdir(tmp_path)  # the manifest's paths are relative to the workflow's folder, as in the rule's job
    [unlabeled] = [c for c in read_manifest(tmp_path / "results/student/two_stage/train_cases.tsv") if c.unlabeled]
    targets = []
    real_loss = train_mod.dice_ce_loss
    monkeypatch.setattr(train_mod, "dice_ce_loss", lambda logits, target: targets.append(target) or real_loss(
        logits, target))
    c2f = {"coarse_size": list(SHAPE), "fine_size": [8, 16, 16], "window": [-100, 200], "margin_mm": 5,
           "train_margin_max_mm": 5, "channels": [4, 8], "coarse_channels": [4, 8], "inplane_pool_levels": 1,
           "epochs": 1, "iterations_per_epoch": 1, "batch_size": 1, "lr": 0.01, "weight_decay": 0,
           "warmup_epochs": 0, "checkpoint_every": 1, "val_fraction": 0.0, "seed": 0, "amp": "none",
           "mirror_axes": []}
    torch.set_num_threads(1)
    train_mod.train([unlabeled], StudentSpec.from_config(c2f, [1, 2, 3]), train_mod.TrainSettings.from_config(c2f),
                    IGNORE, tmp_path / "c2f", tmp_path / "c2f" / "model.pt", tmp_path / "c2f" / "log.tsv")
    coarse_target = targets[0][0].numpy()  # the coarse grid equals the case's: the label as the loss sees it
    np.testing.assert_array_equal(coarse_target == IGNORE_INDEX, uncertain)
    assert (targets[1] == IGNORE_INDEX).any()  # and the fine crop's

    # the nnU-Net student on unlabeled cases: its dataset holds the case and declares the ignore label (the weak
    # cases alone, merged without a filter, would not: it is the unlabeled cases' own setting that asks for it)
    configure(tmp_path, two_stage=True, nn=True)
    snakemake(tmp_path)
    assert manifest_cases(tmp_path, "results/student/nn/nnunet/train_cases.tsv")["u1"] == "unlabeled"
    nnunet = json.loads((tmp_path / NNUNET_DATASET).read_text())
    assert nnunet["labels"]["ignore"] == IGNORE and nnunet["numTraining"] == 3


def test_each_student_trains_with_its_own_threads_or_else_student_threads(tmp_path: Path) -> None:
    """The demo's two_stage trains alone and takes both cores while its baseline, which trains beside the teacher,
    keeps student.threads; the nnU-Net student's training and the later rounds' take the same per-experiment key."""
    dataset(tmp_path)
    configure(tmp_path, threads={"two_stage": 2, "nn": 3})
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    validate(config, str(REPO / "config" / "schema.yaml"), set_default=True)
    nnunet = config["student"]["nnunet"]
    nn_checkpoint = (student_model_folder("results/student/nn/nnunet", Path(NNUNET_DATASET).parent.name,
                                          nnunet["planner"], nnunet["configuration"], nnunet["batch_sizes"][0])
                     / fold_name(nnunet["fold"]) / "checkpoint_final.pth")
    models = ["results/student/two_stage/model/model_final.pt", "results/student/baseline/model/model_final.pt",
              str(nn_checkpoint)]
    threads = planned_threads(snakemake(tmp_path, "--dry-run", "--cores", "4", targets=models).stdout)
    assert threads["student_train experiment=two_stage"] == 2
    assert threads["student_train experiment=baseline"] == 1
    assert [count for job, count in threads.items() if job.startswith("student_nnunet_train ")] == [3]
    rounds = (REPO / "rules" / "rounds.smk").read_text()  # not in this harness (it needs a teacher)
    assert rounds.count("threads: student_train_threads") == 1  # round_student_train


@pytest.mark.parametrize("settings, message", [
    ({"two_stage": True, "include_unlabeled": False},
     r"two_stage train on the unlabeled cases \(unlabeled: true\), but pseudo.include_unlabeled is false"),
    ({"baseline": True}, r"'baseline': unlabeled: true needs labels: merged"),
])
def test_contradicting_settings_stop_planning_with_a_clear_message(tmp_path: Path, settings, message) -> None:
    dataset(tmp_path)
    configure(tmp_path, **settings)
    proc = snakemake(tmp_path, "--dry-run", check=False)
    assert proc.returncode != 0
    assert re.search(message, proc.stdout + proc.stderr), proc.stderr[-3000:]
