"""Benchmark: does the method learn? The whole workflow on a learnable synthetic dataset, with the paper's ordering.

Runs teacher -> pseudo-labels -> merge -> baseline and two_stage students -> evaluation with ``config/learning.yaml``
(at least 40 training cases with the demo's annotation mix, 8 test cases) into its own results folder, stage by
stage so that each stage's wall time is measured, then prints the ablation table, the label quality against the
truth, the coarse-to-fine stages, and PASS/FAIL for each goal:

- teacher organ-average DSC >= 0.80 on the test set; liver, spleen, both kidneys and stomach >= 0.85 each;
- two_stage organ average >= teacher - 0.03;
- two_stage lesion DSC >= 0.30 and above the baseline's;
- baseline (raw weak labels) organ average <= two_stage - 0.20 (the paper's ordering);
- the c2f coarse box holds the whole ground-truth foreground in >= 95 % of the test cases.

The learning curves are written by the workflow (``report/learning_curves.png`` in the results folder). Not part of
``make test``; run it for several seeds (the demo seed draws anatomy, intensities and annotations):

    .venv/bin/python bench/learning.py --seed 2023 --cores 2
    .venv/bin/python bench/learning.py --seed 7 --cores 2 --results results_learning_7
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]

# (stage name, the targets snakemake builds for it); each stage's wall time is measured on its own
STAGES = [
    ("data, QC, statistics, split", ["--until", "split"]),
    ("teacher training", ["--until", "teacher_train"]),
    ("pseudo-labels and merge", ["--until", "merge_summary"]),
    ("student training", ["{results}/student/two_stage/model/model_final.pt",
                          "{results}/student/baseline/model/model_final.pt"]),
    ("predictions, evaluation, report", []),
]
ORGAN_AVERAGE = "Organ average"
KEY_ORGANS = ["Liver", "Spleen", "RK", "LK", "Stomach"]


def write_config(base: Path, results: Path, seed: int) -> Path:
    """The benchmark config with this run's results folder and demo seed, saved inside the results folder."""
    config = yaml.safe_load(base.read_text())
    config["results"] = str(results)
    config.setdefault("demo", {})["seed"] = seed
    results.mkdir(parents=True, exist_ok=True)
    path = results / "learning_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_stages(config: Path, results: Path, cores: int) -> dict[str, float]:
    """Run the workflow stage by stage; returns the wall time of each stage in seconds."""
    times = {}
    for name, targets in STAGES:
        command = [sys.executable, "-m", "snakemake", *(t.format(results=results) for t in targets),
                   "--configfile", str(config), "--cores", str(cores), "--quiet", "progress"]
        started = time.perf_counter()
        print(f"== {name}: snakemake {' '.join(command[3:])}", flush=True)
        subprocess.run(command, cwd=REPO, check=True)
        times[name] = time.perf_counter() - started
        print(f"   {times[name] / 60:.1f} min", flush=True)
    return times


def goals(ablation: pd.DataFrame, stages: pd.DataFrame) -> list[tuple[str, float, str, bool]]:
    """(goal, measured value, threshold text, passed) for every goal of the module docstring."""
    dsc = ablation.set_index("Target")
    lesion = [t for t in dsc.index if t not in KEY_ORGANS and t != ORGAN_AVERAGE][-1:]  # the last class row

    def value(experiment: str, target: str) -> float:
        return float(dsc.loc[target, f"{experiment}_DSC"])

    teacher, student, baseline = (value(e, ORGAN_AVERAGE) for e in ("teacher", "two_stage", "baseline"))
    rows = [("teacher organ average", teacher, ">= 0.80", teacher >= 0.80)]
    rows += [(f"teacher {organ}", value("teacher", organ), ">= 0.85", value("teacher", organ) >= 0.85)
             for organ in KEY_ORGANS]
    rows.append(("two_stage organ average", student, f">= teacher - 0.03 = {teacher - 0.03:.3f}",
                 student >= teacher - 0.03))
    if lesion:
        ours, theirs = value("two_stage", lesion[0]), value("baseline", lesion[0])
        rows.append((f"two_stage {lesion[0]}", ours, f">= 0.30 and > baseline {theirs:.3f}",
                     ours >= 0.30 and ours > theirs))
    rows.append(("baseline organ average", baseline, f"<= two_stage - 0.20 = {student - 0.20:.3f}",
                 baseline <= student - 0.20))
    held = float(stages["box_holds_foreground"].mean())
    rows.append(("c2f coarse box holds the foreground", held, ">= 0.95 of test cases", held >= 0.95))
    return rows


def report(results: Path, times: dict[str, float]) -> bool:
    """Print everything the benchmark measured; returns whether every goal passed."""
    ablation = pd.read_csv(results / "eval" / "ablation.tsv", sep="\t")
    stages = pd.read_csv(results / "eval" / "two_stage" / "c2f_stages.tsv", sep="\t")
    pd.set_option("display.width", 200)
    print("\n== ablation (mean DSC on the test set)")
    print(ablation[["Target"] + [c for c in ablation.columns if c.endswith("_DSC")]].to_string(
        index=False, float_format="%.3f"))
    for name in ("pseudo", "merged"):
        path = results / "eval" / "labels" / f"{name}.tsv"
        if path.exists():
            table = pd.read_csv(path, sep="\t")
            print(f"\n== {name} labels vs truth (mean DSC per class and source)")
            print(table.groupby(["name", "source"], sort=False)["dsc"].agg(["count", "mean"]).to_string(
                float_format="%.3f"))
    print("\n== coarse-to-fine stages of two_stage")
    print(stages.to_string(index=False, float_format="%.3f"))
    print("\n== wall time per stage")
    for name, seconds in times.items():
        print(f"{name:35s} {seconds / 60:6.1f} min")
    print(f"{'total':35s} {sum(times.values()) / 60:6.1f} min")
    print(f"learning curves: {results / 'report' / 'learning_curves.png'}")
    print("\n== goals")
    outcome = goals(ablation, stages)
    for goal, measured, threshold, passed in outcome:
        print(f"{'PASS' if passed else 'FAIL'}  {goal:40s} {measured:.3f}  ({threshold})")
    return all(passed for *_, passed in outcome)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=2023, help="demo seed (anatomy, intensities, annotations)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--config", type=Path, default=REPO / "config" / "learning.yaml")
    parser.add_argument("--results", type=Path, help="results folder (default results_learning/seed<seed>)")
    parser.add_argument("--report-only", action="store_true", help="print the tables of a finished run")
    args = parser.parse_args(argv)
    results = (args.results or REPO / "results_learning" / f"seed{args.seed}").resolve()
    config = write_config(args.config, results, args.seed)
    times = {} if args.report_only else run_stages(config, results, args.cores)
    return 0 if report(results, times) else 1


if __name__ == "__main__":
    sys.exit(main())
