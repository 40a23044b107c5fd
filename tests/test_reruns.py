"""Rerunning parts of a finished run (README, "Rerunning stages"): a changed setting reruns exactly what depends on
it, --forcerun of one rule reruns only its jobs, and a deleted per-case output is rebuilt for that case alone.

Every test starts from a copy of one finished tiny run (the ``completed_run`` fixture, shared by all test modules and
xdist workers of a session; test_interrupt.py and test_slurm.py import it from here), because a run from scratch
costs minutes. The run reads a raw dataset outside its working folder, as real data would be.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml
from filelock import FileLock

from conftest import TINY_CONFIG, run_workflow
from workflow_scripts.labels.pseudo import shard_cases
from workflow_scripts.io.volumes import Geometry

# The label merge's rules, and the stages before it that a merge setting must never rerun (with teacher_*, pseudo_*).
MERGE_RULES = {"merge_case", "merge_summary"}
UPSTREAM_OF_MERGE = {"demo_dataset", "qc_case", "qc_summary", "stats_case", "stats_aggregate", "split"}
# Outputs compared byte for byte between two runs of the same config: those that are a pure function of the data
# and config. nnU-Net's teacher training is not bitwise reproducible, so the teacher's model and everything built
# from it (pseudo-labels, merged labels, the two_stage student) legitimately differ; the baseline student trains on
# the raw labels with a seeded CPU training that resumes with its RNG state, so its predictions must match.
DETERMINISTIC = re.compile(r"^(qc/.*\.(json|tsv)|stats/.*\.tsv|split/split\.tsv|student/baseline/pred/[^/]+\.nii\.gz)$")


def shared_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder all xdist workers of this session see (each worker's basetemp is a child of it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def merged(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied key by key at every nesting level."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_config(path: Path, raw: Path, **changes: dict) -> Path:
    """The tiny config reading the raw dataset in ``raw`` (demo generation off), with ``changes`` merged in.

    Student training runs three epochs (a checkpoint after each), so test_interrupt.py can stop one midway.
    """
    data = {"images": "imagesTr", "labels": "labelsTr", "test_images": "imagesTs", "test_labels": "labelsTs"}
    config = merged(yaml.safe_load(TINY_CONFIG.read_text()), {
        "demo": {"enabled": False},
        "data": {key: str(raw / folder) for key, folder in data.items()},
        "student": {"c2f": {"epochs": 3, "checkpoint_every": 1}},
    })
    path.write_text(yaml.safe_dump(merged(config, changes), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def raw_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo dataset as a raw FLARE layout outside any run folder (the workflow must only read it). Its
    file_states when written are kept next to it (raw_states), so a test can check that no run changed it."""
    shared = shared_tmp(tmp_path_factory)
    raw = shared / "raw"
    with FileLock(str(shared / "raw.lock")):
        if not raw_states(raw).exists():
            build = shared / "raw_build"
            shutil.rmtree(build, ignore_errors=True)
            run_workflow(build, "demo_dataset")
            shutil.rmtree(raw, ignore_errors=True)
            shutil.copytree(build / "results" / "demo", raw)
            raw_states(raw).write_text(json.dumps(file_states(raw)))
    return raw


def raw_states(raw: Path) -> Path:
    return raw.parent / "raw_states.json"


@pytest.fixture(scope="session")
def raw_config(tmp_path_factory: pytest.TempPathFactory, raw_dataset: Path) -> Path:
    """The tiny config on the raw dataset: the config of every run these tests compare."""
    shared = shared_tmp(tmp_path_factory)
    with FileLock(str(shared / "raw_config.lock")):
        path = shared / "tiny_raw.yaml"
        if not path.exists():
            write_config(shared / "tiny_raw.tmp.yaml", raw_dataset).rename(path)
    return path


@pytest.fixture(scope="session")
def completed_run(tmp_path_factory: pytest.TempPathFactory, raw_config: Path) -> Path:
    """Working folder of one finished run of the whole tiny workflow (its Snakemake log next to it, as
    completed_run.log). Read only: tests copy it (copy_run)."""
    shared = shared_tmp(tmp_path_factory)
    run_dir = shared / "completed_run"
    with FileLock(str(shared / "completed_run.lock")):
        if not (shared / "completed_run.done").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            proc = run_workflow(run_dir, config=raw_config)
            (shared / "completed_run.log").write_text(proc.stdout + proc.stderr)
            (shared / "completed_run.done").touch()
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    """Copy a run folder keeping symlinks and timestamps, so Snakemake sees the copy as up to date."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def file_states(root: Path) -> dict[str, tuple[int, str]]:
    """(mtime in ns, sha256) of every regular file under ``root``, by relative path."""
    states = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            states[str(path.relative_to(root))] = (path.stat().st_mtime_ns, digest)
    return states


def changed_files(before: dict[str, tuple[int, str]], after: dict[str, tuple[int, str]]) -> set[str]:
    """Files rewritten (new mtime) or created between two file_states snapshots."""
    return {path for path, state in after.items() if before.get(path, (None,))[0] != state[0]}


def planned_jobs(workdir: Path, config: Path, *args: str) -> Counter:
    """Jobs per rule that Snakemake would run now (its dry-run job table)."""
    proc = run_workflow(workdir, "--dry-run", *args, config=config)
    table = proc.stdout.split("Job stats:", 1)
    if len(table) == 1:
        assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]
        return Counter()
    jobs = Counter()
    for line in table[1].splitlines():
        match = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
        if match and match[1] != "total":
            jobs[match[1]] = int(match[2])
        if match and match[1] == "total":
            break
    return jobs


def executed_rules(snakemake_log: str) -> Counter:
    """Jobs per rule that a (real) Snakemake run finished, from its log."""
    return Counter(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", snakemake_log))


def output_of(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


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
    before = file_states(workdir / "results")
    ran = executed_rules(output_of(run_workflow(workdir, "--until", "merge_summary", config=changed)))
    assert set(ran) == MERGE_RULES, ran
    after = file_states(workdir / "results")
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
def test_forcerun_label_statistics_reruns_only_them(completed_run: Path, raw_config: Path, tmp_path: Path) -> None:
    workdir = copy_run(completed_run, tmp_path / "run")
    before = file_states(workdir / "results")
    proc = run_workflow(workdir, "--forcerun", "stats_case", "stats_aggregate", "--until", "stats_aggregate",
                        config=raw_config)
    ran = executed_rules(output_of(proc))
    assert set(ran) == {"stats_case", "stats_aggregate"}, ran
    rewritten = changed_files(before, file_states(workdir / "results"))
    assert rewritten and all(path.startswith("stats/") for path in rewritten), rewritten
    # statistics are a pure function of the labels: rerunning them gives the same tables
    after = file_states(workdir / "results")
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
    before = file_states(workdir / "results")
    proc = run_workflow(workdir, "--until", "merge_summary", "--forcerun", label, config=raw_config)
    assert executed_rules(output_of(proc)) == Counter({"pseudo_case": 1, "merge_case": 1, "merge_summary": 1})
    rewritten = changed_files(before, file_states(workdir / "results"))
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
    before = file_states(workdir / "results")

    ran = executed_rules(output_of(run_workflow(workdir, "--until", "split", config=config)))
    assert ran == Counter({"qc_case": 2, "stats_case": 2, "qc_summary": 1, "stats_aggregate": 1, "split": 1}), ran
    split = pd.read_csv(workdir / "results" / "split" / "split.tsv", sep="\t", dtype={"classes": str}).set_index("case")
    assert split.loc[added, "category"] == "weak"
    assert split.loc[edited, "category"] == "weak" and str(new_class) in split.loc[edited, "classes"].split(",")

    ran = executed_rules(output_of(run_workflow(workdir, "--until", "merge_summary", config=config)))
    assert ran == Counter({"pseudo_shard": 1, "pseudo_case": 1, "merge_case": 2, "merge_summary": 1}), ran
    rewritten = changed_files(before, file_states(workdir / "results"))
    assert not any(path.startswith("teacher/") for path in rewritten), rewritten
    pseudo = {path for path in rewritten if path.startswith("pseudo/")}
    assert {f"pseudo/{added}.nii.gz", f"pseudo/{added}_confidence.nii.gz"} <= pseudo
    assert all(path.startswith((f"pseudo/shards/{added}/", f"pseudo/{added}")) for path in pseudo), pseudo
    assert {f"merged/{edited}.nii.gz", f"merged/{added}.nii.gz"} <= rewritten
    merged_label = sitk.GetArrayFromImage(sitk.ReadImage(str(workdir / "results" / "merged" / f"{edited}.nii.gz")))
    assert (merged_label == new_class).any()
