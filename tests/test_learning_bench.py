"""The learning benchmark (bench/learning.py): its stage targets on a finished run, and the --beyond-paper extras (the
config it adds, its stages and its goals) on hand-made tables (nothing trains; the benchmark itself is run by hand,
README "Learning benchmark")."""
from __future__ import annotations

import copy
import importlib.util
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml
from snakemake.utils import validate

from conftest import copy_run, planned_jobs
from workflow_scripts.evaluation.evaluate import summary_table

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("learning_bench", REPO / "bench" / "learning.py")
learning = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(learning)

TARGETS = ["Liver", "Spleen", "RK", "LK", "Stomach", "Pancreas", "Lesion", "Organ average"]


def rounds_table(unlabeled: tuple[float, float], round1: tuple[float, float],
                 round2: tuple[float, float]) -> pd.DataFrame:
    """An eval/rounds.tsv with (organ average, lesion) DSC per retrained model; the class rows are filler."""
    table = pd.DataFrame({"Target": TARGETS, "baseline_DSC": 0.5, "baseline_NSD": 0.5, "teacher_DSC": 0.6})
    for column, (organs, lesion) in {"two_stage_round1": round1, "two_stage_round2": round2,
                                     "two_stage_unlabeled_round1": unlabeled,
                                     "two_stage_unlabeled_round2": unlabeled}.items():
        table[f"{column}_DSC"] = [0.7] * 6 + [lesion, organs]
        table[f"{column}_NSD"] = 0.0
    return table


def verdicts(rounds: pd.DataFrame) -> dict[str, bool]:
    return {goal: passed for goal, _, _, passed in learning.beyond_paper_goals(rounds)}


def test_the_extras_pass_when_at_least_as_good_ties_included() -> None:
    outcome = verdicts(rounds_table(unlabeled=(0.75, 0.30), round1=(0.75, 0.27), round2=(0.76, 0.20)))
    assert outcome == {"two_stage_unlabeled Organ average": True, "two_stage_unlabeled Lesion": True,
                       "two_stage round 2 Organ average": True}


@pytest.mark.parametrize("unlabeled, round2, failed", [
    ((0.74, 0.30), (0.76, 0.27), "two_stage_unlabeled Organ average"),
    ((0.76, 0.26), (0.76, 0.27), "two_stage_unlabeled Lesion"),
    ((0.76, 0.30), (0.749, 0.30), "two_stage round 2 Organ average"),
])
def test_each_extra_fails_alone_when_worse(unlabeled, round2, failed) -> None:
    outcome = verdicts(rounds_table(unlabeled=unlabeled, round1=(0.75, 0.27), round2=round2))
    assert [goal for goal, passed in outcome.items() if not passed] == [failed]


def test_goal_rows_carry_the_measured_value_and_what_it_is_compared_with() -> None:
    rows = learning.beyond_paper_goals(rounds_table(unlabeled=(0.70, 0.10), round1=(0.75, 0.27), round2=(0.8, 0.3)))
    assert rows[0] == ("two_stage_unlabeled Organ average", 0.70, ">= two_stage 0.750", False)
    assert rows[2] == ("two_stage round 2 Organ average", 0.8, ">= round 1 0.750", True)


def test_the_compact_table_has_organ_average_and_lesion_of_every_model() -> None:
    rows = learning.beyond_paper_rows(rounds_table(unlabeled=(0.7, 0.1), round1=(0.75, 0.27), round2=(0.8, 0.3)))
    assert list(rows.columns) == ["Organ average", "Lesion"]
    assert list(rows.index) == ["baseline", "teacher", "two_stage_round1", "two_stage_round2",
                                "two_stage_unlabeled_round1", "two_stage_unlabeled_round2"]
    assert rows.loc["two_stage_round2"].tolist() == [0.8, 0.3]


def test_the_default_goals_still_read_an_ablation_table_with_the_extra_column() -> None:
    ablation = pd.DataFrame({"Target": TARGETS, "baseline_DSC": 0.5, "teacher_DSC": 0.9, "two_stage_DSC": 0.9,
                             "two_stage_unlabeled_DSC": 0.1})
    stages = pd.DataFrame({"box_holds_foreground": [True] * 8})
    assert [goal for goal, *_ in learning.goals(ablation, stages)][-3:] == [
        "two_stage Lesion", "baseline organ average", "c2f coarse box holds the foreground"]


def test_the_spread_is_the_standard_error_of_each_mean_over_the_scored_test_cases(tmp_path: Path) -> None:
    """From the summaries the workflow writes (population std): std / sqrt(n - 1) is the sample standard error;
    an experiment without a summary is left out, not an error."""
    labels = [{"name": "Liver", "kind": "organ"}, {"name": "Lesion", "kind": "lesion"}]
    metrics = pd.DataFrame({"Name": ["a", "b", "c"], "Liver_DSC": [0.8, 0.9, 1.0], "Lesion_DSC": [0.0, 0.3, 0.6],
                            "Liver_NSD": 1.0, "Lesion_NSD": 1.0})
    (tmp_path / "eval" / "two_stage").mkdir(parents=True)
    summary_table(metrics, labels).to_csv(tmp_path / "eval" / "two_stage" / "summary.tsv", sep="\t", index=False)
    table = learning.spread(tmp_path, ["two_stage", "baseline"]).set_index("target")
    assert list(table["experiment"]) == ["two_stage", "two_stage"]
    assert table.loc["Lesion", "mean"] == pytest.approx(0.3) and table.loc["Lesion", "cases"] == 3
    assert table.loc["Lesion", "standard_error"] == pytest.approx(pd.Series([0.0, 0.3, 0.6]).sem())
    assert table.loc["Organ average", "standard_error"] == pytest.approx(pd.Series([0.8, 0.9, 1.0]).sem())


def test_the_config_is_the_demo_with_the_benchmark_settings_merged_in_and_is_whole(tmp_path: Path) -> None:
    """A --configfile replaces config/config.yaml (Snakefile), so the benchmark writes the whole config: the demo's,
    with config/learning.yaml's settings merged in key by key, this run's folder and seed."""
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    plain = yaml.safe_load(learning.write_config(REPO / "config" / "learning.yaml", tmp_path, 7).read_text())
    assert (plain["results"], plain["demo"]["seed"]) == (str(tmp_path), 7)
    assert (plain["demo"]["n_train"], plain["demo"]["n_test"]) == (150, 24)
    assert plain["demo"]["completeness"] == {"strong": 0.1, "lesion_only": 0.4, "partial": 0.4, "unlabeled": 0.1}
    assert plain["demo"]["partial_annotations"] == demo["demo"]["partial_annotations"]
    assert plain["teacher"]["epochs"] == 400 and plain["teacher"]["optimizer"] == demo["teacher"]["optimizer"]
    assert plain["student"]["c2f"]["channels"] == [16, 32, 64]
    assert plain["student"]["c2f"]["coarse_size"] == demo["student"]["c2f"]["coarse_size"]
    assert plain["student"]["experiments"] == demo["student"]["experiments"]
    assert set(plain) == set(demo)
    validate(plain, str(REPO / "config" / "schema.yaml"), set_default=True)


def test_the_extras_config_adds_the_experiment_and_a_round_and_keeps_the_default(tmp_path: Path) -> None:
    base = REPO / "config" / "learning.yaml"
    plain = yaml.safe_load(learning.write_config(base, tmp_path, 7).read_text())
    extras = yaml.safe_load(learning.write_config(base, tmp_path, 7, extras=True).read_text())
    assert yaml.safe_load((tmp_path / "learning_config.yaml").read_text()) == plain  # the default stays the default
    assert plain["rounds"]["count"] == 1
    assert extras["student"]["experiments"] == {
        **plain["student"]["experiments"],
        "two_stage_unlabeled": {"labels": "merged", "model": "c2f", "unlabeled": True}}
    assert extras["eval"]["experiments"] == [*plain["eval"]["experiments"], "two_stage_unlabeled"]
    assert extras["eval"]["ablation"] == ["baseline", "teacher", "two_stage", "two_stage_unlabeled"]
    assert extras["rounds"] == {**plain["rounds"], "count": 2}
    assert {key: value for key, value in extras.items() if key not in ("student", "eval", "rounds")} == {
        key: value for key, value in plain.items() if key not in ("student", "eval", "rounds")}
    assert extras["student"]["c2f"] == plain["student"]["c2f"]
    validate(extras, str(REPO / "config" / "schema.yaml"), set_default=True)


def test_the_extras_extend_the_eval_lists_and_leave_the_input_alone() -> None:
    config = {"student": {"experiments": {"two_stage": {"labels": "merged"}}},
              "eval": {"experiments": ["two_stage"], "ablation": ["teacher", "two_stage"]}, "rounds": {"c2f": {}}}
    before = copy.deepcopy(config)
    extras = learning.beyond_paper(config)
    assert extras["eval"] == {"experiments": ["two_stage", "two_stage_unlabeled"],
                              "ablation": ["teacher", "two_stage", "two_stage_unlabeled"]}
    assert extras["rounds"] == {"c2f": {}, "count": 2}
    assert config == before


def test_the_extra_stages_come_after_the_default_ones_and_ask_for_the_extra_models_only() -> None:
    assert [stage.name for stage in learning.STAGES][-1] == "predictions, evaluation, report"
    targets = [target.format(results="R") for stage in learning.BEYOND_PAPER_STAGES for target in stage.targets]
    assert targets == ["R/student/two_stage_unlabeled/model/model_final.pt",
                       "R/round2/student/two_stage/model/model_final.pt",
                       "R/round2/student/two_stage_unlabeled/model/model_final.pt"]
    # every stage's wall time is its own entry
    assert not {stage.name for stage in learning.STAGES} & {stage.name for stage in learning.BEYOND_PAPER_STAGES}


def test_only_the_lone_student_stages_give_the_c2f_trainer_all_cores() -> None:
    """The baseline trains on one core beside the teacher; a student that trains alone gets all (``--set-threads``)."""
    commands = {stage.name: learning.stage_commands(stage, Path("c.yaml"), Path("R"), 2)[0]
                for stage in [*learning.STAGES, *learning.BEYOND_PAPER_STAGES]}
    alone = {name for name, command in commands.items() if command[-2:] == ["--set-threads", "student_train=2"]}
    assert alone == {"two_stage student (all cores)", "rest of the baseline student (all cores)",
                     "unlabeled pseudo-labels and student"}
    # every core the benchmark was given, not a fixed two
    two_stage = next(stage for stage in learning.STAGES if stage.name == "two_stage student (all cores)")
    assert learning.snakemake_command(two_stage.targets, Path("c.yaml"), Path("R"), 4, two_stage.all_cores)[-2:] == [
        "--set-threads", "student_train=4"]
    assert not any("--set-threads" in command for name, command in commands.items() if name not in alone)
    # every call reruns what a stopped call left incomplete (the stopped training resumes from its checkpoint)
    assert all("--rerun-incomplete" in command for command in commands.values())


def test_the_baseline_trains_beside_the_teacher_on_one_core_and_alone_after_the_two_stage_student() -> None:
    teacher = next(stage for stage in learning.STAGES if stage.beside)
    main, beside = learning.stage_commands(teacher, Path("c.yaml"), Path("R"), 2)
    assert main[3:8] == ["R/merged/summary.tsv", "--configfile", "c.yaml", "--cores", "1"]
    assert beside[3:8] == ["R/student/baseline/model/model_final.pt", "--configfile", "c.yaml", "--cores", "1"]
    assert beside[-1] == "--nolock" and "--set-threads" not in beside
    assert learning.stage_commands(teacher, Path("c.yaml"), Path("R"), 4)[0][7] == "3"
    # on one core there is nothing to run beside: one call builds both
    main, beside = learning.stage_commands(teacher, Path("c.yaml"), Path("R"), 1)
    assert beside is None and main[3:5] == ["R/merged/summary.tsv", "R/student/baseline/model/model_final.pt"]
    names = [stage.name for stage in learning.STAGES]
    rest = names.index("rest of the baseline student (all cores)")
    assert names.index("two_stage student (all cores)") < rest < names.index("predictions, evaluation, report")
    assert learning.STAGES[rest].targets == [learning.BASELINE_MODEL]


TOY_SNAKEFILE = """
rule train:
    output: "model.txt"
    shell: "echo 1 > checkpoint.txt && sleep 600 && touch {output}"
"""


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_a_stopped_call_ends_with_its_job_and_its_work_is_rerun_by_the_next_call(tmp_path: Path) -> None:
    """stop() ends snakemake and the job it runs, also when they ignore SIGINT as everything started by
    ``nohup ... &`` does; the job's output is left for the next call (``--rerun-incomplete``) to build, and its
    checkpoint (not an output) stays for it to resume from."""
    (tmp_path / "Snakefile").write_text(TOY_SNAKEFILE)
    command = [sys.executable, "-m", "snakemake", "--cores", "1", "--rerun-incomplete"]
    process = subprocess.Popen(command, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, preexec_fn=ignore_sigint)
    deadline = time.monotonic() + 120
    while not (tmp_path / "checkpoint.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "checkpoint.txt").exists()
    jobs = psutil.Process(process.pid).children(recursive=True)
    assert jobs
    started = time.monotonic()
    learning.stop(process)
    assert time.monotonic() - started < 30  # ended by the signal, not by the kill after STOP_TIMEOUT_S
    assert process.returncode != 0
    assert not any(job.is_running() and job.status() != psutil.STATUS_ZOMBIE for job in jobs)
    assert not (tmp_path / "model.txt").exists() and (tmp_path / "checkpoint.txt").exists()
    # the next call builds what the stopped one left (here without the sleep)
    (tmp_path / "Snakefile").write_text(TOY_SNAKEFILE.replace("sleep 600", "sleep 0"))
    subprocess.run(command + ["--rerun-triggers", "mtime"], cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "model.txt").exists()


def test_stopping_a_call_that_already_ended_checks_that_it_succeeded() -> None:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    learning.stop(done)
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    failed.wait()
    with pytest.raises(subprocess.CalledProcessError):
        learning.stop(failed)


def test_the_report_prints_the_extras_and_their_goals_decide_the_outcome(tmp_path: Path, capsys) -> None:
    """The whole printing path on a fake finished run: every default goal passes, so the extras decide."""
    (tmp_path / "eval" / "two_stage").mkdir(parents=True)
    ablation = pd.DataFrame({"Target": TARGETS, "baseline_DSC": [0.5] * 6 + [0.0, 0.5], "teacher_DSC": 0.9,
                             "two_stage_DSC": 0.9, "two_stage_unlabeled_DSC": 0.9})
    ablation.to_csv(tmp_path / "eval" / "ablation.tsv", sep="\t", index=False)
    pd.DataFrame({"box_holds_foreground": [True] * 8}).to_csv(tmp_path / "eval" / "two_stage" / "c2f_stages.tsv",
                                                             sep="\t", index=False)
    rounds = tmp_path / "eval" / "rounds.tsv"
    rounds_table(unlabeled=(0.9, 0.9), round1=(0.9, 0.9), round2=(0.9, 0.9)).to_csv(rounds, sep="\t", index=False)
    assert learning.report(tmp_path, {"round 2 pseudo-labels, merge and students": 600.0}, extras=True)
    printed = capsys.readouterr().out
    assert "== beyond the paper" in printed and "two_stage_unlabeled_round2" in printed
    assert "PASS  two_stage round 2 Organ average" in printed and "round 2 pseudo-labels, merge and students" in printed
    rounds_table(unlabeled=(0.9, 0.9), round1=(0.9, 0.9), round2=(0.8, 0.9)).to_csv(rounds, sep="\t", index=False)
    assert not learning.report(tmp_path, {}, extras=True)
    assert "FAIL  two_stage round 2 Organ average" in capsys.readouterr().out
    assert learning.report(tmp_path, {})  # without the flag the extras are neither read nor judged


def test_the_stages_of_a_finished_run_plan_nothing_even_without_its_benchmark_files(
        completed_run: Path, raw_config: Path, tmp_path: Path) -> None:
    """A finished run is reused stage by stage, also when its benchmarks/ folder is gone (a results folder from before
    benchmarks moved under <results>/, or cleaned by hand): a rule target (``--until teacher_train``) would retrain
    the teacher for a missing benchmark file, deleting its checkpoint first; the stages ask for files instead."""
    workdir = copy_run(completed_run, tmp_path / "run")
    results = workdir / "results"
    shutil.rmtree(results / "benchmarks")
    for stage in learning.STAGES:
        targets = (t.format(results="results") for t in [*stage.targets, *stage.beside])
        assert planned_jobs(workdir, raw_config, *targets) == Counter(), stage.name
    # the quirk the file targets avoid
    assert planned_jobs(workdir, raw_config, "--until", "teacher_train")["teacher_train"] == 1


def test_the_wall_time_is_judged_only_for_a_run_of_every_default_stage() -> None:
    """The budget is the whole run's: a --report-only call (no times) or a run of some stages has nothing to judge."""
    whole = {stage.name: 8 * 60.0 for stage in learning.STAGES}  # 5 stages x 8 min
    assert learning.wall_time_goal(whole) == [("wall time of the default stages (min)", 40.0, "<= 45", True)]
    slow = dict(whole, **{learning.STAGES[1].name: 16 * 60.0})
    assert [passed for *_, passed in learning.wall_time_goal(slow)] == [False]
    assert learning.wall_time_goal({}) == []
    assert learning.wall_time_goal({learning.STAGES[0].name: 60.0}) == []


def test_a_stage_stops_the_call_beside_it_when_its_own_call_ends_or_fails(monkeypatch, capsys) -> None:
    """run_stage: the beside call runs while the main call does, and is stopped (and said to be) when it ends; a
    failing main call stops it too and fails the stage."""
    started = []

    def commands(main_code: str):
        def stage_commands(*_):
            return [sys.executable, "-c", main_code], [sys.executable, "-c", "import time; time.sleep(600)"]
        return stage_commands

    real_popen = subprocess.Popen

    def popen(*args, **kwargs):  # subprocess.run's calls come through here too: keep the beside calls only
        process = real_popen(*args, **kwargs)
        if kwargs.get("start_new_session"):
            started.append(process)
        return process

    monkeypatch.setattr(learning.subprocess, "Popen", popen)
    stage = learning.STAGES[1]
    monkeypatch.setattr(learning, "stage_commands", commands("import time; time.sleep(0.5)"))
    learning.run_stage(stage, Path("c.yaml"), Path("R"), 2)
    assert started[0].returncode is not None and started[0].returncode != 0
    assert "stopped the call beside it on purpose" in capsys.readouterr().out
    monkeypatch.setattr(learning, "stage_commands", commands("raise SystemExit(2)"))
    with pytest.raises(subprocess.CalledProcessError):
        learning.run_stage(stage, Path("c.yaml"), Path("R"), 2)
    assert len(started) == 2 and started[1].returncode is not None and started[1].returncode != 0
