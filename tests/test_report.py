"""The evaluation stage and the Snakemake report on the tiny dataset.

The label statistics are built by the workflow; the test-set predictions (and their efficiency tables) of the teacher
and both students are synthesised from the test labels, so the evaluation rules, the figures and ``snakemake
--report`` run for real without training; ``--allowed-rules`` keeps Snakemake from wanting to train models for them.

The run is also the workflow's test of awkward but real setups: the raw data and the results folder have paths with
spaces (every shell command must quote them), the results folder lies outside the working directory (logs and
benchmarks go with it), and one test image has no label (it is predicted, not scored).
"""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import output_of, planned_jobs, run_workflow, write_config

from workflow_scripts.io.volumes import read_label, write_volume

EXPERIMENTS = {"teacher": "teacher/pred", "two_stage": "student/two_stage/pred", "baseline": "student/baseline/pred"}
FIGURES = ["dsc_boxplots.png", "efficiency.png", "qualitative.png"]
EVAL_RULES = ["evaluate_experiment", "efficiency_experiment", "ablation", "figure_dsc_boxplots",
              "figure_efficiency", "figure_qualitative"]
# the rules that need test labels: none of them is a default target when the test set has no label at all
SCORING_RULES = {"evaluate_experiment", "ablation", "figure_dsc_boxplots", "figure_qualitative", "c2f_stages"}
LESION = 14
UNLABELLED = "FLARE23Ts_9001"  # a test image without a label


def synthesise_prediction(label: np.ndarray, experiment: str, rng: np.random.Generator) -> np.ndarray:
    """Teacher: organs only. Baseline: loses half of the organs (weak labels). Two-stage: a slightly shifted truth."""
    pred = np.roll(label, int(rng.integers(-1, 2)), axis=int(rng.integers(0, 3)))
    if experiment == "teacher":
        pred[pred == LESION] = 0
    if experiment == "baseline":
        pred[np.isin(pred, rng.choice(np.arange(1, 14), 6, replace=False))] = 0
    return pred


def synthesise_predictions(raw: Path, results: Path) -> list[str]:
    """Predictions of every test image (an unlabelled one gets the prediction of the case its image copies) and
    one efficiency table per experiment; returns the labelled test cases."""
    rng = np.random.default_rng(3)
    cases = []
    for label_path in sorted((raw / "labelsTs").glob("*.nii.gz")):
        case = label_path.name[: -len(".nii.gz")]
        label, geometry = read_label(label_path, case)
        cases.append(case)
        for experiment, folder in EXPERIMENTS.items():
            prediction = synthesise_prediction(label, experiment, rng)
            write_volume(results / folder / f"{case}.nii.gz", prediction, geometry)
            if case == cases[0]:
                write_volume(results / folder / f"{UNLABELLED}.nii.gz", prediction, geometry)
    for experiment, folder in EXPERIMENTS.items():
        rows = [(case, 1.0 + k, 500.0 + 10 * k, 700.0 + k, f"40x40x{24 + k}", "rss")
                for k, case in enumerate(sorted([*cases, UNLABELLED]))]
        (results / folder / "efficiency").mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows, columns=["Name", "Time", "MaxGPU_Mem", "AUC_GPU_Time", "ImageSize", "MemoryKind"]).to_csv(
            results / folder / "efficiency" / "0000.tsv", sep="\t", index=False)
    return cases


@pytest.mark.slow
def test_evaluation_and_report_on_synthesised_predictions(raw_dataset: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw data"
    shutil.copytree(raw_dataset, raw)
    first = sorted((raw / "imagesTs").iterdir())[0]
    shutil.copy(first, raw / "imagesTs" / f"{UNLABELLED}_0000.nii.gz")
    results = tmp_path / "my results"
    config = write_config(tmp_path / "config.yaml", raw, results=str(results))
    workdir = tmp_path / "work dir"
    # the label-statistics figures are report items upstream of the predictions: build them for real
    run_workflow(workdir, str(results / "stats/label_counts.png"), str(results / "stats/class_presence.png"),
                 config=config)
    cases = synthesise_predictions(raw, results)
    targets = [str(results / "eval/ablation.tsv"), *[str(results / "report" / name) for name in FIGURES],
               *[str(results / "eval" / e / name) for e in EXPERIMENTS for name in ("metrics.tsv", "efficiency.tsv")]]
    run_workflow(workdir, *targets, "--allowed-rules", *EVAL_RULES, config=config)

    teacher = pd.read_csv(results / "eval/teacher/metrics.tsv", sep="\t")
    assert list(teacher["Name"]) == cases  # the labelled ones
    assert list(teacher.columns[:3]) == ["Name", "Liver_DSC", "RK_DSC"] and teacher.columns[-1] == "Lesion_NSD"
    lesion_present = [np.any(read_label(raw / "labelsTs" / f"{c}.nii.gz", c)[0] == LESION) for c in cases]
    assert list(teacher["Lesion_DSC"]) == [0.0 if present else 1.0 for present in lesion_present]
    summary = pd.read_csv(results / "eval/two_stage/summary.tsv", sep="\t")
    assert (summary["Scored_cases"] == len(cases)).all() and (summary["Unscored_cases"] == UNLABELLED).all()
    ablation = pd.read_csv(results / "eval/ablation.tsv", sep="\t").set_index("Target")
    assert list(ablation.columns) == ["baseline_DSC", "baseline_NSD", "teacher_DSC", "teacher_NSD",
                                      "two_stage_DSC", "two_stage_NSD"]
    assert ablation.loc["Organ average", "two_stage_DSC"] > ablation.loc["Organ average", "baseline_DSC"]
    efficiency = pd.read_csv(results / "eval/two_stage/efficiency.tsv", sep="\t")
    assert list(efficiency["Name"]) == sorted([*cases, UNLABELLED]) and set(efficiency["MemoryKind"]) == {"rss"}
    log = (results / "logs/evaluate_experiment/two_stage.log").read_text()
    assert f"scored {len(cases)} of {len(cases) + 1} test cases; not scored (no label): 1: {UNLABELLED}" in log
    assert (results / "benchmarks/figure_qualitative/all.tsv").exists()
    assert not (workdir / "logs").exists() and not (workdir / "benchmarks").exists()

    report = tmp_path / "report.zip"
    run_workflow(workdir, *targets, "--allowed-rules", *EVAL_RULES, "--report", str(report), config=config)
    names = zipfile.ZipFile(report).namelist()
    for figure in [*FIGURES, "label_counts.png", "class_presence.png"]:
        assert any(name.endswith(figure) for name in names), f"{figure} missing from the report: {names}"
    assert any(name.endswith("ablation.tsv") for name in names)

    # a test set without any label: the default targets still predict it (and time it) but score nothing, and asking
    # for a score says why it cannot be given
    (raw / "no labels").mkdir()
    plan = tmp_path / "plan"
    unlabelled = write_config(tmp_path / "unlabelled.yaml", raw, results=str(plan / "results"),
                              data={"test_labels": str(raw / "no labels")})
    proc = run_workflow(plan, "--dry-run", config=unlabelled)
    assert "No test image has a label" in output_of(proc)
    jobs = planned_jobs(plan, unlabelled)
    assert jobs["efficiency_experiment"] == len(EXPERIMENTS) and jobs["figure_efficiency"] == 1, jobs
    assert not SCORING_RULES & set(jobs), jobs
    proc = run_workflow(plan, "--dry-run", str(plan / "results/eval/teacher/metrics.tsv"), config=unlabelled,
                        check=False)
    assert proc.returncode != 0 and "nothing to score" in output_of(proc)
