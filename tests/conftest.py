"""Shared test helpers and fixtures: running the workflow on the tiny config in an isolated folder, one finished tiny
run shared by the rerun, interrupt and SLURM tests (``completed_run``), and the small label map of the unit tests."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "tests" / "tiny_config.yaml"


def run_workflow(workdir: Path, *args: str, config: Path = TINY_CONFIG, check: bool = True,
                 timeout: float = 1200) -> subprocess.CompletedProcess:
    """Run snakemake on the repository's Snakefile inside ``workdir`` (results, logs and metadata stay there)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(config), "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture
def workflow_dir(tmp_path: Path) -> Path:
    return tmp_path


# A small label map (two organs, one lesion) and cleanup rules for unit tests of the prediction modules.
LABELS = [{"id": 1, "name": "Liver", "kind": "organ"}, {"id": 2, "name": "Spleen", "kind": "organ"},
          {"id": 3, "name": "Lesion", "kind": "lesion"}]
POSTPROCESS = {"organ": {"keep_largest": 1, "min_size_mm3": 0}, "lesion": {"keep_largest": 0, "min_size_mm3": 10}}


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


# Per-job records that Snakemake writes under the results folder (logs/, benchmarks/; DESIGN.md): every job that runs
# rewrites its own, so the artifacts a rerun rewrote are compared without them.
JOB_RECORDS = ("logs/", "benchmarks/")


def artifact_states(results: Path) -> dict[str, tuple[int, str]]:
    """file_states of a results folder without its job logs and benchmarks."""
    return {path: state for path, state in file_states(results).items() if not path.startswith(JOB_RECORDS)}


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


