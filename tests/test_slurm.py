"""The SLURM profile on a real one-node SLURM cluster (tests/slurm/cluster.sh: Debian packages, no accounting
database, two fake GPUs): the tiny workflow runs with --profile profiles/slurm, its jobs really go through SLURM
(bundled per-case jobs, GPUs for the GPU rules), and its results equal those of the local run.

Needs root (apt-get, daemons); marked ``slurm`` so developers can deselect it (-m "not slurm"); CI runs it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import (
    DETERMINISTIC,
    REPO,
    file_states,
    planned_jobs,
    run_workflow,
)

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
PARTITION = "wlsegtest"


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "installing and starting SLURM daemons needs root"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "SLURM is not installed and apt-get is unavailable"
    return None


def cluster(command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLURM_TEST_PARTITION": PARTITION}
    return subprocess.run([str(CLUSTER), command], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running one-node cluster; stopped afterwards if this fixture started it."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    installed = cluster("install")
    assert installed.returncode == 0, installed.stderr[-3000:]
    already_running = cluster("status").returncode == 0
    started = cluster("start")
    assert started.returncode == 0, started.stderr[-3000:]
    yield
    if not already_running:
        stopped = cluster("stop")
        assert stopped.returncode == 0, stopped.stderr[-3000:]


def slurm_profile(folder: Path) -> Path:
    """The repository's SLURM profile with the test partition filled in and quick first status checks."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    profile["default-resources"]["slurm_partition"] = PARTITION
    profile["slurm-init-seconds-before-status-checks"] = 2
    profile["slurm-keep-successful-logs"] = True
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def slurm_job(job_id: str) -> dict[str, str]:
    """slurmctld's record of a job (kept MinJobAge seconds after it ends; there is no accounting database)."""
    shown = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True,
                           check=True).stdout
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


@pytest.mark.slurm
def test_tiny_workflow_through_slurm_matches_local_run(
    slurm_cluster, completed_run: Path, raw_config: Path, tmp_path: Path  # noqa: F811
) -> None:
    workdir = tmp_path / "run"
    profile = slurm_profile(tmp_path / "profile")
    proc = run_workflow(workdir, "--profile", str(profile), "--workflow-profile", "none", config=raw_config)
    log = proc.stdout + proc.stderr

    # every job went through SLURM: each submission is recorded by slurmctld, finished, with its own log file
    submitted = dict(re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", log))
    assert submitted, log[-3000:]
    for job_id, job_log in submitted.items():
        assert slurm_job(job_id)["JobState"] == "COMPLETED", job_id
        assert Path(job_log).exists()
    # per-case jobs went in bundles: one SLURM job ran all QC cases
    qc_submissions = [path for path in submitted.values() if "/group_qc_cases" in path]
    qc_cases = len(list((workdir / "results" / "qc").glob("*.json")))
    assert len(qc_submissions) == 1 and qc_cases > 1
    # GPU rules (set-resources gpu in the profile) got a (fake) GPU from SLURM, the others none
    gpu_rules = {rule for rule, resources in yaml.safe_load(profile.joinpath("config.yaml").read_text())[
        "set-resources"].items() if resources.get("gpu")}
    ran_gpu_rule = False
    for job_id, job_log in submitted.items():
        rule = re.search(r"/rule_(\w+)/", job_log)
        wants_gpu = rule is not None and rule[1] in gpu_rules
        ran_gpu_rule |= wants_gpu
        assert ("gpu" in slurm_job(job_id).get("TresPerJob", "")) == wants_gpu, job_log
    assert ran_gpu_rule

    # same results as the local run
    assert planned_jobs(workdir, raw_config) == Counter()
    local = file_states(completed_run / "results")
    remote = file_states(workdir / "results")
    compared = {path for path in local if DETERMINISTIC.match(path)}
    assert any(path.startswith("student/") for path in compared)
    assert {path for path in compared if remote.get(path, (0, ""))[1] != local[path][1]} == set()
