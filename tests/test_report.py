"""The evaluation stage and the Snakemake report on the tiny demo.

The demo data and the label statistics are built by the workflow; the test-set predictions (and their efficiency
tables) of the teacher and both students are synthesised from the demo's test labels, so the evaluation rules, the
figures and ``snakemake --report`` run for real without training; ``--allowed-rules`` keeps Snakemake from wanting
to train models for them.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_workflow

from workflow_scripts.io.volumes import read_label, write_volume

EXPERIMENTS = {"teacher": "results/teacher/pred", "two_stage": "results/student/two_stage/pred",
               "baseline": "results/student/baseline/pred"}
FIGURES = ["dsc_boxplots.png", "efficiency.png", "qualitative.png"]
EVAL_RULES = ["evaluate_experiment", "efficiency_experiment", "ablation", "figure_dsc_boxplots",
              "figure_efficiency", "figure_qualitative"]
LESION = 14


def synthesise_prediction(label: np.ndarray, experiment: str, rng: np.random.Generator) -> np.ndarray:
    """Teacher: organs only. Baseline: loses half of the organs (weak labels). Two-stage: a slightly shifted truth."""
    pred = np.roll(label, int(rng.integers(-1, 2)), axis=int(rng.integers(0, 3)))
    if experiment == "teacher":
        pred[pred == LESION] = 0
    if experiment == "baseline":
        pred[np.isin(pred, rng.choice(np.arange(1, 14), 6, replace=False))] = 0
    return pred


def synthesise_predictions(workdir: Path) -> list[str]:
    rng = np.random.default_rng(3)
    cases = []
    for label_path in sorted((workdir / "results" / "demo" / "labelsTs").glob("*.nii.gz")):
        case = label_path.name[: -len(".nii.gz")]
        label, geometry = read_label(label_path, case)
        cases.append(case)
        for experiment, folder in EXPERIMENTS.items():
            write_volume(workdir / folder / f"{case}.nii.gz", synthesise_prediction(label, experiment, rng), geometry)
    for experiment, folder in EXPERIMENTS.items():
        rows = [(case, 1.0 + k, 500.0 + 10 * k, 700.0 + k, f"40x40x{24 + k}", "rss") for k, case in enumerate(cases)]
        (workdir / folder / "efficiency").mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows, columns=["Name", "Time", "MaxGPU_Mem", "AUC_GPU_Time", "ImageSize", "MemoryKind"]).to_csv(
            workdir / folder / "efficiency" / "0000.tsv", sep="\t", index=False)
    return cases


@pytest.mark.slow
def test_evaluation_and_report_on_synthesised_predictions(tmp_path: Path) -> None:
    # the label-statistics figures are report items upstream of the predictions: build them for real
    run_workflow(tmp_path, "results/stats/label_counts.png", "results/stats/class_presence.png")
    cases = synthesise_predictions(tmp_path)
    targets = ["results/eval/ablation.tsv", *[f"results/report/{name}" for name in FIGURES],
               *[f"results/eval/{e}/{name}" for e in EXPERIMENTS for name in ("metrics.tsv", "efficiency.tsv")]]
    run_workflow(tmp_path, *targets, "--allowed-rules", *EVAL_RULES)

    teacher = pd.read_csv(tmp_path / "results/eval/teacher/metrics.tsv", sep="\t")
    assert list(teacher["Name"]) == cases
    assert list(teacher.columns[:3]) == ["Name", "Liver_DSC", "RK_DSC"] and teacher.columns[-1] == "Lesion_NSD"
    lesion_present = [np.any(read_label(tmp_path / f"results/demo/labelsTs/{c}.nii.gz", c)[0] == LESION)
                      for c in cases]
    assert list(teacher["Lesion_DSC"]) == [0.0 if present else 1.0 for present in lesion_present]
    ablation = pd.read_csv(tmp_path / "results/eval/ablation.tsv", sep="\t").set_index("Target")
    assert list(ablation.columns) == ["baseline_DSC", "baseline_NSD", "teacher_DSC", "teacher_NSD",
                                      "two_stage_DSC", "two_stage_NSD"]
    assert ablation.loc["Organ average", "two_stage_DSC"] > ablation.loc["Organ average", "baseline_DSC"]
    efficiency = pd.read_csv(tmp_path / "results/eval/two_stage/efficiency.tsv", sep="\t")
    assert list(efficiency["Name"]) == cases and set(efficiency["MemoryKind"]) == {"rss"}
    assert (tmp_path / "logs/evaluate_experiment/two_stage.log").read_text().strip()
    assert (tmp_path / "benchmarks/figure_qualitative/all.tsv").exists()

    report = tmp_path / "report.zip"
    run_workflow(tmp_path, *targets, "--allowed-rules", *EVAL_RULES, "--report", str(report))
    names = zipfile.ZipFile(report).namelist()
    for figure in [*FIGURES, "label_counts.png", "class_presence.png"]:
        assert any(name.endswith(figure) for name in names), f"{figure} missing from the report: {names}"
    assert any(name.endswith("ablation.tsv") for name in names)
