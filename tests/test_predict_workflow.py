"""Prediction on new scans (config section ``predict``, target ``snakemake predict``) and the exported coarse-to-fine
student applied outside Snakemake, on a copy of the finished tiny run (conftest's ``completed_run``): only
prediction jobs run, nothing upstream is touched, every output keeps its scan's geometry, a model segments a scan
as in its test-set predictions, inside and outside the workflow, and a copy of a scan stored with flipped x/y
direction cosines gets the same segmentation in physical space."""
from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from conftest import (
    changed_files,
    copy_run,
    executed_rules,
    artifact_states,
    output_of,
    planned_jobs,
    run_workflow,
    write_config,
)

TEST_CASES = ["FLARE23Ts_0001", "FLARE23Ts_0002"]  # the tiny config's test set
PREDICT_JOBS = Counter({"predict_shard_0000": 1, "predict": 1})


@pytest.fixture
def scans(raw_dataset: Path, tmp_path: Path) -> Path:
    """A folder of new scans without labels: the test images, and the first again with flipped x/y cosines."""
    folder = tmp_path / "new_scans"
    folder.mkdir()
    for case in TEST_CASES:
        shutil.copy(raw_dataset / "imagesTs" / f"{case}_0000.nii.gz", folder)
    flipped = sitk.DICOMOrient(sitk.ReadImage(str(folder / f"{TEST_CASES[0]}_0000.nii.gz")), "RAS")
    assert flipped.GetDirection() == (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    sitk.WriteImage(flipped, str(folder / "flipped_0000.nii.gz"))
    return folder


def labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def assert_same_geometry(output: Path, scan: Path) -> None:
    out, image = sitk.ReadImage(str(output)), sitk.ReadImage(str(scan))
    assert out.GetPixelID() == sitk.sitkUInt8
    assert (out.GetSize(), out.GetSpacing(), out.GetOrigin(), out.GetDirection()) == (
        image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def on_grid_of(moving: Path, reference: Path) -> np.ndarray:
    """``moving``'s labels sampled on ``reference``'s voxel grid (nearest neighbour; voxel centres coincide)."""
    image = sitk.Resample(sitk.ReadImage(str(moving)), sitk.ReadImage(str(reference)), sitk.Transform(),
                          sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(image)


def predict_only(workdir: Path, config: Path) -> None:
    """Plan and run the predict target: prediction jobs only, and no file outside results/predict/ rewritten."""
    assert planned_jobs(workdir, config, "predict") == PREDICT_JOBS
    assert planned_jobs(workdir, config) == PREDICT_JOBS + Counter({"all": 1})  # rule all adds only these
    before = artifact_states(workdir / "results")
    ran = executed_rules(output_of(run_workflow(workdir, "predict", config=config)))
    assert ran == PREDICT_JOBS, ran
    rewritten = changed_files(before, artifact_states(workdir / "results"))
    assert rewritten and all(path.startswith("predict/") for path in rewritten), rewritten


@pytest.mark.slow
def test_c2f_student_segments_new_scans_in_and_outside_the_workflow(completed_run: Path, raw_dataset: Path,
                                                                    scans: Path, tmp_path: Path) -> None:
    workdir = copy_run(completed_run, tmp_path / "run")
    results = workdir / "results"
    config = write_config(tmp_path / "predict.yaml", raw_dataset, predict={"images": str(scans), "model": "two_stage"})
    predict_only(workdir, config)

    out = results / "predict" / "new_scans"  # named after the scans' folder
    cases = sorted(p.name.removesuffix("_0000.nii.gz") for p in scans.iterdir())
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{case}.nii.gz" for case in cases]
    for case in cases:
        assert_same_geometry(out / f"{case}.nii.gz", scans / f"{case}_0000.nii.gz")
    for case in TEST_CASES:  # the same model and predictor as the test-set predictions
        expected = labels(results / "student" / "two_stage" / "pred" / f"{case}.nii.gz")
        assert np.array_equal(labels(out / f"{case}.nii.gz"), expected)
    first = out / f"{TEST_CASES[0]}.nii.gz"
    assert len(np.unique(labels(first))) > 1
    assert np.array_equal(on_grid_of(out / "flipped.nii.gz", first), labels(first))
    efficiency = pd.read_csv(out / "efficiency.tsv", sep="\t")
    assert efficiency["Name"].tolist() == cases and (efficiency["Time"] > 0).all()

    # the exported student, applied outside Snakemake, segments the scans exactly as the workflow did
    ran = executed_rules(output_of(run_workflow(workdir, "results/student/two_stage/export/two_stage.pt",
                                                config=config)))
    assert ran == Counter({"student_export": 1}), ran
    exported = results / "student" / "two_stage" / "export" / "two_stage.pt"
    standalone = tmp_path / "standalone"
    proc = subprocess.run([sys.executable, "-m", "workflow_scripts.c2f.apply", "--model", str(exported),
                           "-i", str(scans), "-o", str(standalone), "--device", "cpu", "--threads", "1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case in cases:
        assert np.array_equal(labels(standalone / f"{case}.nii.gz"), labels(out / f"{case}.nii.gz")), case
        assert_same_geometry(standalone / f"{case}.nii.gz", scans / f"{case}_0000.nii.gz")


@pytest.mark.slow
def test_teacher_segments_new_scans_through_the_nnunet_predictor(completed_run: Path, raw_dataset: Path,
                                                                 scans: Path, tmp_path: Path) -> None:
    workdir = copy_run(completed_run, tmp_path / "run")
    config = write_config(tmp_path / "predict.yaml", raw_dataset,
                          predict={"images": str(scans), "model": "teacher", "name": "by_teacher"})
    predict_only(workdir, config)
    out = workdir / "results" / "predict" / "by_teacher"
    log = (workdir / "results" / "logs" / "predict_shard" / "by_teacher_0000.log").read_text()
    assert "FLARE23Ts_0001" in log
    for case in TEST_CASES:  # the teacher's test predictions come from the same predictor and settings
        expected = labels(workdir / "results" / "teacher" / "pred" / f"{case}.nii.gz")
        assert np.array_equal(labels(out / f"{case}.nii.gz"), expected)
    assert_same_geometry(out / "flipped.nii.gz", scans / "flipped_0000.nii.gz")
    assert pd.read_csv(out / "efficiency.tsv", sep="\t")["Name"].tolist() == sorted(TEST_CASES + ["flipped"])


def test_predict_without_scans_or_with_an_unknown_model_says_what_to_set(raw_config: Path, raw_dataset: Path,
                                                                         scans: Path, tmp_path: Path) -> None:
    """Planning only (no run needed): the default config has no prediction jobs, and `snakemake predict` says which
    key to set; an unknown model is named with the experiments there are."""
    proc = run_workflow(tmp_path / "a", "--dry-run", "predict", config=raw_config, check=False)
    assert proc.returncode != 0 and "set predict.images" in output_of(proc)
    assert "predict_shard" not in output_of(run_workflow(tmp_path / "b", "--dry-run", config=raw_config))
    unknown = write_config(tmp_path / "unknown.yaml", raw_dataset, predict={"images": str(scans), "model": "nope"})
    proc = run_workflow(tmp_path / "c", "--dry-run", "predict", config=unknown, check=False)
    assert proc.returncode != 0 and "predict.model 'nope'" in output_of(proc)
    assert "baseline" in output_of(proc)
