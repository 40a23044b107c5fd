"""The student stage inside the workflow: both experiments train on the tiny config and predict the test set, and a
training whose outputs are lost resumes from its checkpoint instead of starting over."""
from __future__ import annotations

import pandas as pd
import pytest
import SimpleITK as sitk

from conftest import run_workflow

EXPERIMENTS = ("two_stage", "baseline")
TEST_CASES = ("FLARE23Ts_0001", "FLARE23Ts_0002")  # the tiny config's two test cases


@pytest.mark.slow
def test_both_experiments_train_and_predict_the_test_set_then_resume(workflow_dir) -> None:
    results = workflow_dir / "results"
    targets = [f"results/student/{e}/pred/efficiency/0000.tsv" for e in EXPERIMENTS]
    run_workflow(workflow_dir, *targets)

    for experiment in EXPERIMENTS:
        root = results / "student" / experiment
        manifest = pd.read_csv(root / "train_cases.tsv", sep="\t")
        assert len(manifest) > 0
        labels_dir = "merged" if experiment == "two_stage" else "labelsTr"
        assert manifest["label"].str.contains(f"/{labels_dir}/").all()
        log = pd.read_csv(root / "model" / "training_log.tsv", sep="\t")
        assert log["epoch"].tolist() == [1] and log["loss"].notna().all()
        assert (root / "checkpoints" / "latest.pt").exists()
        efficiency = pd.read_csv(root / "pred" / "efficiency" / "0000.tsv", sep="\t")
        assert efficiency["Name"].tolist() == list(TEST_CASES)
        for case in TEST_CASES:
            image = sitk.ReadImage(str(results / "demo" / "imagesTs" / f"{case}_0000.nii.gz"))
            prediction = sitk.ReadImage(str(root / "pred" / f"{case}.nii.gz"))
            assert prediction.GetPixelID() == sitk.sitkUInt8
            assert prediction.GetSize() == image.GetSize() and prediction.GetSpacing() == image.GetSpacing()
            assert prediction.GetOrigin() == image.GetOrigin()

    # a lost model (e.g. a job killed while writing it) is rebuilt from the checkpoint, not retrained; Snakemake
    # only rebuilds a deleted intermediate file when it is named as a target
    (results / "student" / "baseline" / "model" / "model_final.pt").unlink()
    run_workflow(workflow_dir, "results/student/baseline/model/model_final.pt")
    assert (results / "student" / "baseline" / "model" / "model_final.pt").exists()
    train_log = (results / "logs" / "student_train" / "baseline.log").read_text()
    assert "resumed from" in train_log and "epoch 1/1" not in train_log
