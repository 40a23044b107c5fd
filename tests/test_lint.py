"""The workflow passes Snakemake's linter and snakefmt, and every rule declares what a scheduler needs."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, TINY_CONFIG


def test_snakefmt_check() -> None:
    files = [str(REPO / "Snakefile"), *sorted(str(p) for p in (REPO / "rules").glob("*.smk"))]
    proc = subprocess.run([sys.executable, "-m", "snakefmt", "--check", *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_snakemake_lint_is_clean(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(TINY_CONFIG), "--lint"],
        capture_output=True, text=True,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Congratulations" in output, output[-5000:]


def _rules(tmp_path) -> dict:
    """Each rule's log/benchmark presence, resource names, priority and runtime at attempts 1 and 2, from the parsed
    workflow."""
    code = f"""
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, ResourceSettings
with SnakemakeApi() as api:
    wf = api.workflow(resource_settings=ResourceSettings(), config_settings=ConfigSettings(configfiles=[Path({str(TINY_CONFIG)!r})]),
                      snakefile=Path({str(REPO / 'Snakefile')!r}), workdir=Path({str(tmp_path)!r}))
    out = {{}}
    for rule in wf._workflow.rules:
        if rule.name == "all":
            continue
        runtime = rule.resources.get("runtime")
        out[rule.name] = dict(log=bool(rule.log), benchmark=rule.benchmark is not None,
                              resources=sorted(rule.resources), priority=rule.priority,
                              runtime=[runtime.evaluate({{}}, attempt=a).value for a in (1, 2)])
    print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rules = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rules, "no rules found"
    return rules


def test_every_rule_declares_log_benchmark_and_resources(tmp_path) -> None:
    """Parse the workflow and inspect each rule object, so a cluster can schedule every job."""
    rules = _rules(tmp_path)
    missing = []
    for name, info in rules.items():
        for key in ("log", "benchmark"):
            if not info[key]:
                missing.append(f"{name}: no {key}")
        for res in ("mem_mb", "runtime"):
            if res not in info["resources"]:
                missing.append(f"{name}: no resources.{res}")
    assert not missing, "\n".join(missing)


def test_training_rules_get_more_time_on_each_retry(tmp_path) -> None:
    """A training killed at its time limit is retried (SLURM profile: retries) and resumes from its checkpoint; the
    retry must get more time than the attempt that was killed."""
    rules = _rules(tmp_path)
    for name in ("teacher_train", "student_train", "student_nnunet_train"):
        first, second = rules[name]["runtime"]
        assert second == 2 * first > 0, (name, first, second)


def test_the_path_from_teacher_to_student_training_goes_first(tmp_path) -> None:
    """On a few cores the jobs the students' training waits for (pseudo-labels, merge, manifests) and the training
    itself take a free core before test-set predictions and evaluations, which nothing downstream waits for; the
    teacher's chain, which the two_stage student waits for and a baseline student does not, goes before all of them."""
    rules = _rules(tmp_path)
    path = ("pseudo_shard", "pseudo_case", "merge_case", "merge_summary", "merge_students", "student_manifest",
            "student_train")
    side = [name for name in rules if name.startswith(("teacher_predict", "student_predict", "evaluate", "figure"))]
    assert side, "no side rules found"
    assert {rules[name]["priority"] for name in path} == {10}
    teacher = ("teacher_dataset", "teacher_preprocess", "teacher_configure", "teacher_train")
    assert {rules[name]["priority"] for name in teacher} == {20}, "a baseline student must not delay the teacher"
    assert {rules[name]["priority"] for name in side} == {0}
