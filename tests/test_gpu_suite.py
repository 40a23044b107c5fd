"""The GPU check (bench/gpu_suite.sh): its CPU rehearsal runs every step on tiny shapes and writes the summary; the
launcher finds the interpreter and the import path as a GPU machine without the venv needs; failures become rows."""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import REPO

SCRIPT = REPO / "bench" / "gpu_suite.sh"
_spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "bench" / "gpu_suite.py")
gpu_suite = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(gpu_suite)


def read_summary(path: Path) -> dict[tuple[str, str], str]:
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    assert list(table.columns) == ["step", "metric", "value"]
    return {(row.step, row.metric): row.value for row in table.itertuples()}


def suite_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("OUT", "PYTHON")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def test_quick_cpu_run_writes_every_step_to_the_summary(tmp_path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--quick", "--threads", "1", "--out", str(out)],
                          env=suite_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + (out / "gpu_suite.log").read_text()[-6000:]
    summary = read_summary(out / "gpu_suite.tsv")
    assert {step: summary[(step, "status")] for step in gpu_suite.STEPS} == {step: "ok" for step in gpu_suite.STEPS}
    assert summary[("env", "gpu")] == "none" and summary[("env", "version:nnunetv2")].startswith("2.")
    assert summary[("nvml", "memory_kind")] == "rss" and float(summary[("nvml", "peak_mb")]) >= 64
    for step in ("c2f_train", "nnunet_train"):
        assert math.isfinite(float(summary[(step, "final_loss")])), step
    assert summary[("nnunet_train", "torch_compile")] == "false"
    assert float(summary[("pseudo_label_speed", "ours_s_per_case")]) > 0
    assert float(summary[("student_speed", "student_s_per_case")]) > 0
    assert "===== student_speed" in (out / "gpu_suite.log").read_text()


def test_the_full_run_measures_the_issues_sizes_on_cuda(tmp_path) -> None:
    commands = {step.name: " ".join(step.command) for step in gpu_suite.plan_steps("cuda", False, 16, tmp_path)}
    assert list(commands) == list(gpu_suite.STEPS)
    assert "student_speed.py --device cuda --shape 512 512 300" in commands["student_speed"]
    assert "pseudo_label_speed.py --device cuda --shape 512 512 100" in commands["pseudo_label_speed"]
    assert all("--skip-nnunet" not in command and "--quick" not in command for command in commands.values())
    assert gpu_suite.BUDGET_S <= 12 * 60


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks how a CUDA run fails where there is no GPU")
def test_a_failed_step_and_an_exhausted_budget_are_rows_and_fail_the_run(tmp_path) -> None:
    assert gpu_suite.main(["--device", "cuda", "--steps", "nvml", "--out", str(tmp_path / "a")]) == 1
    failed = read_summary(tmp_path / "a" / "gpu_suite.tsv")
    assert failed[("nvml", "status")] == "failed (exit 1)"
    assert gpu_suite.main(["--steps", "env,nvml", "--budget-s", "0", "--out", str(tmp_path / "b")]) == 1
    skipped = read_summary(tmp_path / "b" / "gpu_suite.tsv")
    assert skipped[("env", "status")] == skipped[("nvml", "status")] == "skipped (budget)"


def test_launcher_uses_the_venv_if_present_else_python3_and_puts_the_repo_on_the_path(tmp_path) -> None:
    """On the GPU machine there is no .venv and the packages come from PYTHONPATH=/tmp/site."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "bench" / "gpu_suite.sh")
    (repo / "bench" / "gpu_suite.py").write_text(
        "import os, sys\nprint(sys.executable)\nprint(os.environ['PYTHONPATH'])\nprint(' '.join(sys.argv[1:]))\n")
    shim = tmp_path / "bin" / "python3"
    shim.parent.mkdir()
    shim.symlink_to(sys.executable)
    env = suite_env(PYTHONPATH="/tmp/site", PATH=f"{shim.parent}{os.pathsep}{os.environ['PATH']}")

    def launch() -> list[str]:
        proc = subprocess.run(["bash", str(repo / "bench" / "gpu_suite.sh"), "--quick"], env=env,
                              capture_output=True, text=True, check=True)
        return proc.stdout.splitlines()

    executable, path, argv = launch()
    assert executable == str(shim)
    assert path == f"/tmp/site:{repo}"
    assert argv == f"--out {repo}/results/gpu_suite --quick"
    venv_python = repo / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(sys.executable)
    assert launch()[0] == str(venv_python)
