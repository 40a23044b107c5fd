"""Interruption recovery: a run killed with SIGKILL (Snakemake and all its jobs) in the middle of a student training
finishes with --rerun-incomplete without redoing a finished job; the killed training continues from its checkpoint;
the results equal an uninterrupted run's; and no run of the session changed the raw dataset.

The interrupted run is the second half of the workflow (label merging onwards, forced on a copy of the finished tiny
run) rather than a whole run from scratch: the teacher is not bitwise reproducible, so only a run that shares the
finished run's teacher can be compared with it file by file, and it takes a fraction of the time."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from conftest import (
    REPO,
    copy_run,
    executed_rules,
    file_states,
    output_of,
    planned_jobs,
    raw_states,
    run_workflow,
)

KILL_TIMEOUT_S = 600
# What the interrupted half of the workflow rebuilds from the finished run's pseudo-labels: merged labels, and the
# predictions and metrics of the students (their trainings are seeded and resume with their RNG state).
RESUMED_OUTPUTS = re.compile(r"^(merged/.*|student/[^/]+/pred/[^/]+\.nii\.gz|eval/[^/]+/metrics\.tsv)$")


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
    workdir = copy_run(completed_run, tmp_path / "run")
    for checkpoints in (workdir / "results" / "student").glob("*/checkpoints"):
        shutil.rmtree(checkpoints)  # so a checkpoint appears only once a training of this run is under way
    rerun = ("--forcerun", "merge_case")
    planned = planned_jobs(workdir, raw_config, *rerun)
    assert planned["merge_case"] > 1 and planned["student_train"] >= 1
    output = tmp_path / "killed_run.log"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(raw_config), "--cores", "2", *rerun]
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
    assert first["merge_case"] == planned["merge_case"]  # finished before the kill, so must not run again

    run_workflow(workdir, "--unlock", config=raw_config)  # a killed Snakemake leaves its lock behind
    second = executed_rules(output_of(run_workflow(workdir, "--rerun-incomplete", config=raw_config)))

    # no finished job ran twice: the two halves add up to exactly the planned jobs
    assert first + second == planned, (first, second, planned)
    # the killed training picked up its checkpoint instead of starting over
    train_log = (workdir / "results" / "logs" / "student_train" / f"{checkpoint.parent.parent.name}.log").read_text()
    assert f"resumed from {checkpoint.relative_to(workdir)}" in train_log, train_log[-2000:]
    # nothing left to do, and the same results as the uninterrupted run, file by file
    assert planned_jobs(workdir, raw_config) == Counter()
    reference = file_states(completed_run / "results")
    resumed = file_states(workdir / "results")
    compared = {path for path in reference if RESUMED_OUTPUTS.match(path)}
    assert any(path.startswith("student/two_stage/pred/") for path in compared)
    assert {path for path in compared if resumed.get(path, (0, ""))[1] != reference[path][1]} == set()
    # no run of this session wrote to the raw data (every one reads it; this test runs after the finished run)
    assert file_states(raw_dataset) == {path: tuple(state) for path, state in
                                        json.loads(raw_states(raw_dataset).read_text()).items()}
