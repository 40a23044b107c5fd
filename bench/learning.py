"""Benchmark: does the method learn? The whole workflow on a learnable synthetic dataset, with the paper's ordering.

Runs teacher -> pseudo-labels -> merge -> baseline and two_stage students -> evaluation with ``config/learning.yaml``
(150 training cases: the demo's annotation kinds and partial organ sets in FLARE23's proportions, 10 % strong;
24 test cases) into its own results folder, stage by stage so that each stage's wall time is measured, then prints
the ablation table, the label quality against the truth, the coarse-to-fine stages, the standard error of each mean
over the test cases, and PASS/FAIL for each goal:

- teacher organ-average DSC >= 0.80 on the test set; liver, spleen, both kidneys and stomach >= 0.85 each;
- two_stage organ average >= teacher - 0.03;
- two_stage lesion DSC >= 0.30 and above the baseline's;
- baseline (raw weak labels) organ average <= two_stage - 0.20 (the paper's ordering);
- the c2f coarse box holds the whole ground-truth foreground in >= 95 % of the test cases;
- the whole run (the default stages) takes <= 45 min of wall time (judged only when this call ran every stage).
  ``config/learning.yaml`` trades this goal for the lesion: 2,400 updates per student, since the lesion is
  update-bound, put the run at ~58 min on the faster 2-core machine (139 on the slower) (README "Learning benchmark").

The learning curves are written by the workflow (``report/learning_curves.png`` in the results folder). Not part of
``make test``; run it for several seeds (the demo seed draws anatomy, intensities and annotations):

    .venv/bin/python bench/learning.py --seed 2023 --cores 2
    .venv/bin/python bench/learning.py --seed 7 --cores 2 --results results_learning_7

Run one benchmark at a time: the two_stage student's stage takes every core (two such trainings on two cores ran ~5×
slower per epoch than one).

``--beyond-paper`` adds what the paper does not do (README "Unlabeled cases", "Rounds"): a two_stage student that
also trains on the unlabeled cases (``two_stage_unlabeled``) and a second round (``rounds.count: 2``), with goals:

- two_stage_unlabeled organ average and lesion DSC >= two_stage's (the unlabeled cases do not hurt);
- two_stage round 2 organ average >= round 1 (a second round does not hurt).

It first runs the default benchmark's stages with the default config (so their work and times are exactly the
default run's, and a finished default run is reused), then the extra stages, each timed, with a second config that
adds the extras (``learning_beyond_paper_config.yaml``). Only jobs that gather every experiment or every
pseudo-labelled case (the counting tables, the merge summary, label quality, the ablation table, the figures) differ
between the two configs: rerunning with the flag rebuilds those, in seconds, and nothing else.
"""
from __future__ import annotations

import argparse
import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import pandas as pd
import yaml
from snakemake.utils import update_config

REPO = Path(__file__).resolve().parents[1]


class Stage(NamedTuple):
    """One timed snakemake call: the files it builds, the rules it gives every core (``--set-threads``) instead of the
    config's threads, for a training that runs alone, and the files a second call builds on one core beside it
    (``beside``): that call is stopped as soon as the first is done, and a later stage finishes its work."""
    name: str
    targets: list[str]
    all_cores: tuple[str, ...] = ()
    beside: tuple[str, ...] = ()


# Each stage's wall time is measured on its own. Files, not rules (`--until teacher_train`): snakemake reruns a *rule*
# target whose benchmark file is missing, which retrained the teacher of results folders written before logs and
# benchmarks moved under <results>/ (and deleted its checkpoint). The critical path is teacher -> pseudo-labels ->
# merge -> two_stage; the baseline student needs no teacher, so it trains on one core beside the teacher's chain
# (which gets the other core) until the merge is done, is stopped there (losing at most one epoch: the benchmark
# checkpoints every epoch) so that the two_stage student has every core to itself, and then finishes from its
# checkpoint on every core. Letting it run on to its end instead left one core idle for ~12 of the ~47 min.
BASELINE_MODEL = "{results}/student/baseline/model/model_final.pt"
STAGES = [
    Stage("data, QC, statistics, split", ["{results}/split/split.tsv"]),
    Stage("teacher, pseudo-labels, merge (baseline beside)", ["{results}/merged/summary.tsv"],
          beside=(BASELINE_MODEL,)),
    Stage("two_stage student (all cores)", ["{results}/student/two_stage/model/model_final.pt"], ("student_train",)),
    Stage("rest of the baseline student (all cores)", [BASELINE_MODEL], ("student_train",)),
    Stage("predictions, evaluation, report", []),
]
STOP_TIMEOUT_S = 120  # for a stopped call to end its jobs before they are killed
# --beyond-paper: the extra experiment, run after the default stages; each extra stage asks only for what it adds, so
# its wall time is its own (the unlabeled cases' pseudo-labels and merges go with their student, not with round 1's)
UNLABELED = "two_stage_unlabeled"
BEYOND_PAPER_STAGES = [
    Stage("unlabeled pseudo-labels and student", [f"{{results}}/student/{UNLABELED}/model/model_final.pt"],
          ("student_train",)),
    # round 2 retrains every c2f student on merged labels: two_stage and two_stage_unlabeled (README "Rounds")
    Stage("round 2 pseudo-labels, merge and students", [f"{{results}}/round2/student/{name}/model/model_final.pt"
                                                        for name in ("two_stage", UNLABELED)]),
    Stage("extra predictions, evaluation, report", []),
]
ORGAN_AVERAGE = "Organ average"
WALL_TIME_GOAL_MIN = 45.0  # on 2 CPU cores (the budget)
KEY_ORGANS = ["Liver", "Spleen", "RK", "LK", "Stomach"]

Goal = tuple[str, float, str, bool]  # (goal, measured value, threshold text, passed)


def beyond_paper(config: dict) -> dict:
    """``config`` (a whole config, as write_config builds it) plus the extras: the unlabeled experiment (scored, in
    the ablation table) and a second round. The default experiments keep their settings, so their round-1 files stay
    up to date."""
    config = copy.deepcopy(config)
    config["student"]["experiments"][UNLABELED] = {"labels": "merged", "model": "c2f", "unlabeled": True}
    for key in ("experiments", "ablation"):
        config["eval"][key] = [*config["eval"][key], UNLABELED]
    config["rounds"]["count"] = 2
    return config


def write_config(base: Path, results: Path, seed: int, extras: bool = False) -> Path:
    """The whole benchmark config: config/config.yaml (the demo) with ``base``'s settings merged in as Snakemake
    merges config files (mappings key by key, everything else replaced), this run's results folder and demo seed;
    saved inside the results folder (``learning_config.yaml``; with ``extras``,
    ``learning_beyond_paper_config.yaml`` with beyond_paper's additions). Whole, because a --configfile replaces
    the demo's config rather than extending it (Snakefile), and so the file records every setting of the run."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    update_config(config, yaml.safe_load(base.read_text()))
    config["results"] = str(results)
    config["demo"]["seed"] = seed
    if extras:
        config = beyond_paper(config)
    results.mkdir(parents=True, exist_ok=True)
    path = results / ("learning_beyond_paper_config.yaml" if extras else "learning_config.yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake_command(targets: Sequence[str], config: Path, results: Path, cores: int,
                      all_cores: Sequence[str] = (), *extra: str) -> list[str]:
    """The snakemake call that builds ``targets`` (``python -m snakemake`` with this interpreter). Jobs that a
    stopped call left incomplete are rerun: a stopped training resumes from its checkpoint."""
    threads = [f"{rule}={cores}" for rule in all_cores]
    return [sys.executable, "-m", "snakemake", *(t.format(results=results) for t in targets),
            "--configfile", str(config), "--cores", str(cores), "--quiet", "progress", "--rerun-incomplete",
            *(["--set-threads", *threads] if threads else []), *extra]


def stop(process: subprocess.Popen) -> None:
    """End a snakemake call started in its own session: SIGTERM to its process group (snakemake and its jobs), so the
    jobs end at once and snakemake, seeing them fail, cleans up and exits; the group is killed if it has not ended
    within STOP_TIMEOUT_S. Not SIGINT (Ctrl-C): a benchmark started in the background (``nohup ... &``) runs with
    SIGINT ignored, inherited by every job, and the stopped training went on for the whole timeout. A call that
    already ended must have succeeded."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    elif process.returncode:
        raise subprocess.CalledProcessError(process.returncode, process.args)


def stage_commands(stage: Stage, config: Path, results: Path, cores: int) -> tuple[list[str], list[str] | None]:
    """A stage's main snakemake call, and its ``beside`` call (None without one): that runs on one of the cores, in
    its own session and without the directory lock (its targets share no job with the main call's), and is stopped
    once the main call is done. With one core the ``beside`` targets are simply built in the main call."""
    if not stage.beside or cores < 2:
        return snakemake_command([*stage.targets, *stage.beside], config, results, cores, stage.all_cores), None
    return (snakemake_command(stage.targets, config, results, cores - 1, stage.all_cores),
            snakemake_command(stage.beside, config, results, 1, (), "--nolock"))


def run_stage(stage: Stage, config: Path, results: Path, cores: int) -> None:
    """Run one stage's calls (stage_commands); the ``beside`` call is stopped when the main call ends."""
    main, beside = stage_commands(stage, config, results, cores)
    if beside is None:
        subprocess.run(main, cwd=REPO, check=True)
        return
    process = subprocess.Popen(beside, cwd=REPO, start_new_session=True)
    try:
        subprocess.run(main, cwd=REPO, check=True)
    finally:
        running = process.poll() is None
        stop(process)
    if running:
        print(f"   stopped the call beside it on purpose (the error it logged above is that stop); a later stage goes "
              f"on from its checkpoint: {' '.join(stage.beside).format(results=results)}", flush=True)


def run_stages(config: Path, results: Path, cores: int, stages: list[Stage] = STAGES) -> dict[str, float]:
    """Run the workflow stage by stage; returns the wall time of each stage in seconds."""
    times = {}
    for stage in stages:
        started = time.perf_counter()
        print(f"== {stage.name}: {' '.join(stage.targets) or 'everything'}"
              f"{' (beside: ' + ' '.join(stage.beside) + ')' if stage.beside else ''}".format(results=results),
              flush=True)
        run_stage(stage, config, results, cores)
        times[stage.name] = time.perf_counter() - started
        print(f"   {times[stage.name] / 60:.1f} min", flush=True)
    return times


def lesion_target(table: pd.DataFrame) -> list[str]:
    """The lesion's row name (the last class row, as the demo's label map puts it), or none without class rows."""
    return [t for t in table["Target"] if t not in KEY_ORGANS and t != ORGAN_AVERAGE][-1:]


def goals(ablation: pd.DataFrame, stages: pd.DataFrame) -> list[Goal]:
    """(goal, measured value, threshold text, passed) for every goal of the module docstring."""
    dsc = ablation.set_index("Target")
    lesion = lesion_target(ablation)

    def value(experiment: str, target: str) -> float:
        return float(dsc.loc[target, f"{experiment}_DSC"])

    teacher, student, baseline = (value(e, ORGAN_AVERAGE) for e in ("teacher", "two_stage", "baseline"))
    rows = [("teacher organ average", teacher, ">= 0.80", teacher >= 0.80)]
    rows += [(f"teacher {organ}", value("teacher", organ), ">= 0.85", value("teacher", organ) >= 0.85)
             for organ in KEY_ORGANS]
    rows.append(("two_stage organ average", student, f">= teacher - 0.03 = {teacher - 0.03:.4f}",
                 student >= teacher - 0.03))
    if lesion:
        ours, theirs = value("two_stage", lesion[0]), value("baseline", lesion[0])
        rows.append((f"two_stage {lesion[0]}", ours, f">= 0.30 and > baseline {theirs:.3f}",
                     ours >= 0.30 and ours > theirs))
    rows.append(("baseline organ average", baseline, f"<= two_stage - 0.20 = {student - 0.20:.4f}",
                 baseline <= student - 0.20))
    held = float(stages["box_holds_foreground"].mean())
    rows.append(("c2f coarse box holds the foreground", held, ">= 0.95 of test cases", held >= 0.95))
    return rows


def wall_time_goal(times: dict[str, float]) -> list[Goal]:
    """The run's wall time (minutes of the default stages) against the budget, when this call ran all of them; a
    --report-only call or a partial rerun has no whole-run time to judge."""
    if not all(stage.name in times for stage in STAGES):
        return []
    minutes = sum(times[stage.name] for stage in STAGES) / 60
    return [("wall time of the default stages (min)", minutes, f"<= {WALL_TIME_GOAL_MIN:.0f}",
             minutes <= WALL_TIME_GOAL_MIN)]


def beyond_paper_goals(rounds: pd.DataFrame) -> list[Goal]:
    """The --beyond-paper goals, from the rounds table (eval/rounds.tsv: ``<experiment>_round<k>_DSC`` columns for
    the retrained students). "At least as good" rather than "better": on 8 test cases a tie is no evidence of harm,
    and the extras must first not hurt before their gain is worth measuring on more seeds."""
    dsc = rounds.set_index("Target")
    ours, first, second = f"{UNLABELED}_round1_DSC", "two_stage_round1_DSC", "two_stage_round2_DSC"
    rows = []
    for target in [ORGAN_AVERAGE, *lesion_target(rounds)]:
        with_them, without = float(dsc.loc[target, ours]), float(dsc.loc[target, first])
        rows.append((f"{UNLABELED} {target}", with_them, f">= two_stage {without:.3f}", with_them >= without))
    later, earlier = float(dsc.loc[ORGAN_AVERAGE, second]), float(dsc.loc[ORGAN_AVERAGE, first])
    rows.append((f"two_stage round 2 {ORGAN_AVERAGE}", later, f">= round 1 {earlier:.3f}", later >= earlier))
    return rows


def beyond_paper_rows(rounds: pd.DataFrame) -> pd.DataFrame:
    """Organ average and lesion DSC of every column of the rounds table, one row per model (experiment and round):
    the compact view of what the extras changed."""
    targets = [ORGAN_AVERAGE, *lesion_target(rounds)]
    dsc = rounds.set_index("Target").loc[targets, [c for c in rounds.columns if c.endswith("_DSC")]]
    return dsc.T.rename(index=lambda column: column.removesuffix("_DSC")).rename_axis("model")


def spread(results: Path, experiments: Sequence[str]) -> pd.DataFrame:
    """Mean, standard error of the mean and number of test cases of the organ-average and lesion DSC of each
    experiment whose ``eval/<experiment>/summary.tsv`` exists.

    Why: the goals compare means over few test cases (24 in config/learning.yaml, 8 before) whose per-case lesion
    DSC spreads from 0 to ~0.9, so a mean within about two standard errors of its threshold is decided by which cases
    the test set drew as much as by the method. The summaries hold the population std (numpy's); the standard error is
    std / sqrt(n - 1).
    """
    rows = []
    for experiment in experiments:
        path = results / "eval" / experiment / "summary.tsv"
        if not path.exists():
            continue
        summary = pd.read_csv(path, sep="\t").set_index("Target")
        for target in [ORGAN_AVERAGE, *summary.index[summary["Kind"] == "lesion"]]:
            n = int(summary.loc[target, "Scored_cases"])
            std = float(summary.loc[target, "DSC_std"])
            rows.append({"experiment": experiment, "target": target, "mean": float(summary.loc[target, "DSC_mean"]),
                         "standard_error": std / (n - 1) ** 0.5 if n > 1 else float("nan"), "cases": n})
    return pd.DataFrame(rows, columns=["experiment", "target", "mean", "standard_error", "cases"])


def report(results: Path, times: dict[str, float], extras: bool = False) -> bool:
    """Print everything the benchmark measured; returns whether every goal passed."""
    ablation = pd.read_csv(results / "eval" / "ablation.tsv", sep="\t")
    stages = pd.read_csv(results / "eval" / "two_stage" / "c2f_stages.tsv", sep="\t")
    dsc_columns = [c for c in ablation.columns if c.endswith("_DSC")]
    pd.set_option("display.width", 200)
    print("\n== ablation (mean DSC on the test set)")
    print(ablation[["Target", *dsc_columns]].to_string(index=False, float_format="%.3f"))
    for name in ("pseudo", "merged"):
        path = results / "eval" / "labels" / f"{name}.tsv"
        if path.exists():
            table = pd.read_csv(path, sep="\t")
            print(f"\n== {name} labels vs truth (mean DSC per class and source)")
            print(table.groupby(["name", "source"], sort=False)["dsc"].agg(["count", "mean"]).to_string(
                float_format="%.3f"))
    experiments = [c.removesuffix("_DSC") for c in dsc_columns]
    print("\n== spread over the test cases (DSC mean and its standard error)")
    print(spread(results, experiments).to_string(index=False, float_format="%.3f"))
    print("\n== coarse-to-fine stages of two_stage")
    print(stages.to_string(index=False, float_format="%.3f"))
    print("\n== wall time per stage")
    for name, seconds in times.items():
        print(f"{name:48s} {seconds / 60:6.1f} min")
    print(f"{'total':48s} {sum(times.values()) / 60:6.1f} min")
    print(f"learning curves: {results / 'report' / 'learning_curves.png'}")
    outcome = goals(ablation, stages) + wall_time_goal(times)
    if extras:
        rounds = pd.read_csv(results / "eval" / "rounds.tsv", sep="\t")
        print("\n== beyond the paper: unlabeled cases and rounds (mean DSC on the test set)")
        print(beyond_paper_rows(rounds).to_string(float_format="%.3f"))
        outcome += beyond_paper_goals(rounds)
    print("\n== goals")
    for goal, measured, threshold, passed in outcome:
        print(f"{'PASS' if passed else 'FAIL'}  {goal:40s} {measured:.4f}  ({threshold})")
    return all(passed for *_, passed in outcome)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=2023, help="demo seed (anatomy, intensities, annotations)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--config", type=Path, default=REPO / "config" / "learning.yaml")
    parser.add_argument("--results", type=Path, help="results folder (default results_learning/seed<seed>)")
    parser.add_argument("--report-only", action="store_true", help="print the tables of a finished run")
    parser.add_argument("--beyond-paper", action="store_true",
                        help="also train on the unlabeled cases and run a second round (after the default stages)")
    args = parser.parse_args(argv)
    results = (args.results or REPO / "results_learning" / f"seed{args.seed}").resolve()
    config = write_config(args.config, results, args.seed)
    times = {} if args.report_only else run_stages(config, results, args.cores)
    if args.beyond_paper:
        config = write_config(args.config, results, args.seed, extras=True)
        if not args.report_only:
            times |= run_stages(config, results, args.cores, BEYOND_PAPER_STAGES)
    return 0 if report(results, times, args.beyond_paper) else 1


if __name__ == "__main__":
    sys.exit(main())
