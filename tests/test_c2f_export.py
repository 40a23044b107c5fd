"""The exported coarse-to-fine student (one self-contained file) and the standalone command that applies it to
files or folders outside Snakemake: same segmentation as the workflow's predictor, exact geometry, clear errors."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from conftest import LABELS, POSTPROCESS
from workflow_scripts.c2f import apply, export, predict
from workflow_scripts.c2f.model import StudentSpec, save_model
from workflow_scripts.evaluation.efficiency import EFFICIENCY_COLUMNS
from workflow_scripts.io.orientation import CANONICAL
from workflow_scripts.labels.postprocess import rules_from_config

C2F = {"window": [-325, 325], "coarse_size": [8, 12, 12], "fine_size": [12, 24, 20], "coarse_channels": [4, 8],
       "channels": [4, 8], "inplane_pool_levels": 1}
SETTINGS = export.InferenceSettings(margin_mm=15.0, amp="fp16", postprocess=POSTPROCESS, labels=LABELS)


@pytest.fixture
def model_file(tmp_path):
    """A (randomly initialised) model_final.pt as rule student_train writes it."""
    torch.manual_seed(0)
    spec = StudentSpec.from_config(C2F, [1, 2, 3])
    path = tmp_path / "model_final.pt"
    save_model(path, spec, *spec.build())
    return path


@pytest.fixture
def exported(tmp_path, model_file):
    path = tmp_path / "export" / "two_stage.pt"
    export.main(["--model", str(model_file), "--output", str(path), "--experiment", "two_stage",
                 "--margin-mm", "15", "--amp", "fp16", "--label-map", json.dumps(LABELS),
                 "--postprocess", json.dumps(POSTPROCESS)])
    return path


def write_scan(path, shape=(10, 26, 22), seed=0, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> str:
    rng = np.random.default_rng(seed)
    array = rng.normal(-100, 20, shape)
    array[3:7, 5:15, 4:12] += 300
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing((1.3, 1.1, 3.5))
    image.SetOrigin((-12.5, 40.0, -7.25))
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return str(path)


def test_export_holds_networks_and_inference_settings(exported) -> None:
    student, settings = export.load_exported(exported, "cpu")
    assert settings == SETTINGS and settings.orientation == CANONICAL
    assert student.amp == "fp16" and student.spec.class_ids == (0, 1, 2, 3)
    payload = torch.load(exported, weights_only=True)  # loadable without running pickled code
    assert payload["format"] == export.FORMAT and payload["experiment"] == "two_stage"


def test_bare_model_file_and_foreign_files_are_refused(tmp_path, model_file) -> None:
    with pytest.raises(ValueError, match="not an exported"):
        export.load_exported(model_file, "cpu")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        export.load_exported(tmp_path / "junk.pt", "cpu")


def test_export_refuses_a_label_map_without_the_models_classes(tmp_path, model_file) -> None:
    with pytest.raises(SystemExit, match=r"label ids \[3\]"):
        export.main(["--model", str(model_file), "--output", str(tmp_path / "x.pt"), "--experiment", "e",
                     "--margin-mm", "20", "--amp", "none", "--label-map", json.dumps(LABELS[:2]),
                     "--postprocess", json.dumps(POSTPROCESS)])
    assert not (tmp_path / "x.pt").exists()


def test_apply_segments_a_folder_like_the_workflow_predictor(tmp_path, model_file, exported) -> None:
    scans = [write_scan(tmp_path / "in" / f"case{i}_0000.nii.gz", seed=i) for i in range(2)]
    (tmp_path / "in" / "notes.txt").write_text("not a scan")
    apply.main(["--model", str(exported), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                "--device", "cpu", "--threads", "1", "--efficiency", str(tmp_path / "eff.tsv"), "--interval", "0.01"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case0.nii.gz", "case1.nii.gz"]
    # the workflow's own predictor, with the settings the export recorded
    student = predict.Student.load(model_file, "cpu", "fp16")
    rules = rules_from_config(POSTPROCESS, LABELS)
    for i, scan in enumerate(scans):
        predict.predict_case(student, f"case{i}", scan, str(tmp_path / f"ref{i}.nii.gz"), 15.0, rules)
        out = sitk.ReadImage(str(tmp_path / "out" / f"case{i}.nii.gz"))
        ref = sitk.ReadImage(str(tmp_path / f"ref{i}.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(ref))
        image = sitk.ReadImage(scan)
        assert out.GetSize() == image.GetSize() and out.GetSpacing() == image.GetSpacing()
        assert out.GetOrigin() == image.GetOrigin() and out.GetDirection() == image.GetDirection()
        assert out.GetPixelID() == sitk.sitkUInt8
    table = pd.read_csv(tmp_path / "eff.tsv", sep="\t")
    assert list(table.columns) == EFFICIENCY_COLUMNS and table["Name"].tolist() == ["case0", "case1"]


def test_apply_to_single_files_any_name_and_format(tmp_path, exported) -> None:
    scan = write_scan(tmp_path / "scan_0000.nii.gz")
    other = tmp_path / "other.mha"
    sitk.WriteImage(sitk.ReadImage(scan), str(other))
    apply.main(["--model", str(exported), "-i", scan, "-o", str(tmp_path / "seg.nii.gz"), "--device", "cpu"])
    apply.main(["--model", str(exported), "-i", scan, str(other), "-o", str(tmp_path / "out"), "--device", "cpu"])
    single = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "seg.nii.gz")))
    for name in ("scan", "other"):
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"{name}.nii.gz"))), single)


def test_plan_jobs_catches_mistakes_before_loading_a_model(tmp_path) -> None:
    write_scan(tmp_path / "a" / "x_0000.nii.gz")
    write_scan(tmp_path / "b" / "x_0000.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="does not exist"):
        apply.plan_jobs([str(tmp_path / "nowhere")], str(tmp_path / "out"))
    with pytest.raises(ValueError, match="no image ending in '_0000.nii.gz'"):
        apply.plan_jobs([str(tmp_path / "empty")], str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"same case ids \['x'\]"):
        apply.plan_jobs([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"))
    with pytest.raises(ValueError, match="one file"):
        apply.plan_jobs([str(tmp_path / "a")], str(tmp_path / "x.nii.gz"))
    scan = write_scan(tmp_path / "c" / "y.nii.gz")
    with pytest.raises(ValueError, match="overwrite input"):
        apply.plan_jobs([scan], str(tmp_path / "c"))
    assert apply.case_id("FLARE23_0001_0000.nii.gz") == "FLARE23_0001"
    assert apply.case_id("scan.v2.nii.gz") == "scan.v2" and apply.case_id("scan.mha") == "scan"


def test_apply_names_an_unreadable_scan_and_writes_nothing_for_it(tmp_path, exported) -> None:
    write_scan(tmp_path / "in" / "good_0000.nii.gz")
    (tmp_path / "in" / "bad_0000.nii.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(SystemExit, match=r"'bad'.*bad_0000\.nii\.gz"):
        apply.main(["--model", str(exported), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                    "--device", "cpu", "--efficiency", str(tmp_path / "eff.tsv")])
    assert not (tmp_path / "out" / "bad.nii.gz").exists() and not (tmp_path / "eff.tsv").exists()
