"""Interruption recovery: a run killed with SIGKILL (Snakemake and all its jobs) in the middle of a student training
finishes with --rerun-incomplete without redoing a finished job; the killed training continues from its checkpoint;
the results equal an uninterrupted run's; and the raw dataset is byte-identical before and after."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from conftest import REPO, run_workflow
from test_reruns import (  # noqa: F401 (shared fixtures)
    DETERMINISTIC,
    completed_run,
    executed_rules,
    file_states,
    output_of,
    planned_jobs,
    raw_config,
    raw_dataset,
)

KILL_TIMEOUT_S = 900


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (its jobs); the list is taken before the first kill, so no job is
    re-parented and missed."""
    parent = psutil.Process(pid)
    for process in [parent, *parent.children(recursive=True)]:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs([parent], timeout=30)


def first_checkpoint_of_unfinished_training(results: Path) -> Path | None:
    """A student checkpoint written while its training is still running (the moment to pull the plug)."""
    for checkpoint in results.glob("student/*/checkpoints/latest.pt"):
        if not (checkpoint.parent.parent / "model" / "model_final.pt").exists():
            return checkpoint
    return None


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_finished_jobs(
    completed_run: Path, raw_config: Path, raw_dataset: Path, tmp_path: Path  # noqa: F811
) -> None:
    raw_before = file_states(raw_dataset)
    workdir = tmp_path / "run"
    output = tmp_path / "killed_run.log"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(raw_config), "--cores", "2"]
    with output.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + KILL_TIMEOUT_S
        checkpoint = None
        while checkpoint is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            checkpoint = first_checkpoint_of_unfinished_training(workdir / "results")
        assert checkpoint is not None, f"no training checkpoint to interrupt:\n{output.read_text()[-3000:]}"
        kill_tree(proc.pid)
    first = executed_rules(output.read_text())
    experiment = checkpoint.parent.parent.name

    run_workflow(workdir, "--unlock", config=raw_config)  # a killed Snakemake leaves its lock behind
    second = executed_rules(output_of(run_workflow(workdir, "--rerun-incomplete", config=raw_config)))

    # no finished job ran twice: the two halves add up to exactly the jobs of one uninterrupted run
    reference = executed_rules((completed_run.parent / "completed_run.log").read_text())
    assert first + second == reference, (first, second, reference)
    assert second["student_train"] >= 1
    # the killed training picked up its checkpoint instead of starting over
    train_log = (workdir / "logs" / "student_train" / f"{experiment}.log").read_text()
    assert f"resumed from {checkpoint.relative_to(workdir)}" in train_log, train_log[-2000:]
    # same results as the uninterrupted run; the raw data untouched
    assert planned_jobs(workdir, raw_config) == Counter()
    local = file_states(completed_run / "results")
    resumed = file_states(workdir / "results")
    compared = {path for path in local if DETERMINISTIC.match(path)}
    assert any(path.startswith("student/") for path in compared)
    assert {path for path in compared if resumed.get(path, (0, ""))[1] != local[path][1]} == set()
    assert file_states(raw_dataset) == raw_before
