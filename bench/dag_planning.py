"""Time `snakemake -n` on a FLARE23-sized layout: 4,000 training cases (2,200 labelled) and 100 test cases.

Case discovery and the per-case rules must plan in seconds for a real dataset (goal <= 20 s). The files are
hard links to one tiny NIfTI volume (planning never opens them). The config is config/flare23.yaml with its data
paths pointed at the synthetic layout. Because QC and the split are checkpoints, a dry run plans up to them: the
per-case QC jobs, the QC summary and the jobs that do not depend on the checkpoints (the test-set side); the rest
of the DAG is planned when the checkpoints have run.

    .venv/bin/python bench/dag_planning.py [--cases 4000] [--labelled 2200] [--test 100] [--profile] [TARGET ...]
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml

REPO = Path(__file__).resolve().parents[1]
GOAL_S = 20.0


def write_layout(root: Path, n_train: int, n_labelled: int, n_test: int) -> dict[str, str]:
    """Folders of hard-linked tiny files in the FLARE23 layout; returns the ``data`` config section."""
    root.mkdir(parents=True)
    source = root / "tiny.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 2, 2), np.uint8)), str(source))
    data = {key: str(root / key) for key in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    for folder in data.values():
        os.makedirs(folder)
    for i in range(n_train):
        os.link(source, os.path.join(data["imagesTr"], f"FLARE23_{i:04d}_0000.nii.gz"))
        if i < n_labelled:
            os.link(source, os.path.join(data["labelsTr"], f"FLARE23_{i:04d}.nii.gz"))
    for i in range(n_test):
        os.link(source, os.path.join(data["imagesTs"], f"FLARE23Ts_{i:04d}_0000.nii.gz"))
        os.link(source, os.path.join(data["labelsTs"], f"FLARE23Ts_{i:04d}.nii.gz"))
    return {"images": data["imagesTr"], "labels": data["labelsTr"], "test_images": data["imagesTs"],
            "test_labels": data["labelsTs"]}


def job_counts(output: str) -> dict[str, int]:
    """The `Job stats` table of a dry run, as rule -> planned jobs."""
    table = output.split("Job stats:", 1)[-1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4000)
    parser.add_argument("--labelled", type=int, default=2200)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--profile", action="store_true", help="run snakemake under cProfile (top 25 functions)")
    parser.add_argument("targets", nargs="*", help="files to plan, relative to the results folder (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = yaml.safe_load((REPO / "config" / "flare23.yaml").read_text())
        config["data"].update(write_layout(tmp / "FLARE23", args.cases, args.labelled, args.test))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config))
        prefix = [sys.executable, "-m", "cProfile", "-s", "cumulative", "-m"] if args.profile else [sys.executable,
                                                                                                     "-m"]
        cmd = [*prefix, "snakemake", "-n", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(tmp / "work"), "--configfile", str(tmp / "config.yaml"), "--cores", "2",
               *(os.path.join(config["results"], target) for target in args.targets)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        print(re.sub(r"(\n {8}\S+)+", "\n        ...", proc.stdout)[-3000:], proc.stderr[-3000:], sep="\n")
        return 1
    if args.profile:
        print("\n".join(proc.stdout.split("Ordered by: cumulative time", 1)[-1].splitlines()[:30]))
    print(f"targets: {' '.join(args.targets) or 'all'}")
    counts = job_counts(proc.stdout)
    print(f"layout: {args.cases} training cases ({args.labelled} labelled), {args.test} test cases")
    print("planned jobs: " + ", ".join(f"{rule} {n}" for rule, n in counts.items()))
    print(f"snakemake -n: {seconds:.1f} s (goal <= {GOAL_S:.0f} s; {seconds / GOAL_S:.2f} of the budget: "
          f"{'met' if seconds <= GOAL_S else 'NOT met'})")
    # CPU time does not grow when other work shares the machine; wall time does
    print(f"CPU time of snakemake: {usage.ru_utime + usage.ru_stime:.1f} s; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
