"""Shared test helpers: running the workflow on the tiny config in an isolated folder."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
