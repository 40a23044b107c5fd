"""Tests of the fast nnU-Net predictor: agreement with nnU-Net's own prediction, exact output geometry, label ids
mapped back, ensembles, TTA switch, efficiency rows and clear errors for missing models and bad images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

import tiny_nnunet as tn
from workflow_scripts.evaluation.efficiency import EFFICIENCY_COLUMNS
from workflow_scripts.nnunet import predict as npred
from workflow_scripts.io.volumes import CaseError, read_volume

LABELS = [{"id": i, "name": n, "kind": "lesion" if i == 14 else "organ"} for i, n in tn.LABEL_NAMES.items()]
NO_CLEANUP = {"organ": {"keep_largest": 0, "min_size_mm3": 0}, "lesion": {"keep_largest": 0, "min_size_mm3": 0}}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    return tn.trained_model(tmp_path_factory)


@pytest.fixture(scope="module")
def ensemble(model) -> npred.Ensemble:
    return npred.load_ensemble([model["model"]], "all", "cpu", tta=True)


@pytest.fixture(scope="module")
def oblique_case(tmp_path_factory) -> str:
    """A case on another grid than the training data (resampling needed) with a flipped, non-identity direction."""
    label = tn.make_label(5, shape=(20, 30, 28))
    image = sitk.GetImageFromArray(tn.make_image(label, 5))
    image.SetSpacing((1.7, 1.6, 2.4))
    image.SetOrigin((-3.0, 7.5, 12.25))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    path = tmp_path_factory.mktemp("oblique") / "obl_0000.nii.gz"
    sitk.WriteImage(image, str(path))
    return str(path)


def test_output_label_ids_map_back_to_workflow_ids(model):
    dataset = json.loads((Path(model["model"]) / "dataset.json").read_text())
    assert npred.output_label_ids(dataset, 3).tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match=r"outputs \[3\]"):
        npred.output_label_ids(dataset, 4)


def test_agrees_with_nnunet_predict_from_files(model, ensemble, oblique_case, tmp_path):
    """Same model, same TTA: our torch export must match nnU-Net's default (scikit-image) export."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    reference = nnUNetPredictor(use_mirroring=True, device=ensemble.device, allow_tqdm=False)
    reference.initialize_from_trained_model_folder(str(model["model"]), ("all",))
    images = [model["cases"][0].image, oblique_case]
    reference.predict_from_files_sequential([[i] for i in images], [str(tmp_path / "a"), str(tmp_path / "b")],
                                            False, True, None)
    for image, out in zip(images, ("a", "b")):
        expected = np.array([0, 1, 3])[sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{out}.nii.gz")))]
        volume, geometry = read_volume(image, "x")
        labels, confidence = npred.predict_volume(ensemble, volume, geometry.spacing_zyx, with_confidence=True)
        assert labels.dtype == np.uint8 and labels.shape == volume.shape
        assert set(np.unique(labels)) <= {0, 1, 3}
        assert np.mean(labels == expected) >= 0.995
        assert confidence.shape == volume.shape and confidence.min() >= 1 / 3 - 1e-6 and confidence.max() <= 1 + 1e-6


def test_zero_border_outside_nnunets_crop_box_is_certain_background(model, ensemble, tmp_path):
    """nnU-Net crops a case to its non-zero box: outside it our labels are background with confidence 1, inside
    they match nnU-Net's own prediction of the padded case."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    label = tn.make_label(3)
    image = np.pad(tn.make_image(label, 3), ((2, 3), (4, 0), (0, 5)))
    path = tn.write_array(image, tmp_path / "padded_0000.nii.gz")
    reference = nnUNetPredictor(use_mirroring=True, device=ensemble.device, allow_tqdm=False)
    reference.initialize_from_trained_model_folder(str(model["model"]), ("all",))
    reference.predict_from_files_sequential([[path]], [str(tmp_path / "ref")], False, True, None)
    expected = np.array([0, 1, 3])[sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ref.nii.gz")))]
    volume, geometry = read_volume(path, "padded")
    labels, confidence = npred.predict_volume(ensemble, volume, geometry.spacing_zyx, with_confidence=True)
    inside = (slice(2, -3), slice(4, None), slice(0, -5))
    outside = np.ones(volume.shape, bool)
    outside[inside] = False
    assert labels.shape == confidence.shape == volume.shape
    assert (labels[outside] == 0).all() and (confidence[outside] == 1).all()
    assert confidence[inside].min() < 1 and np.mean(labels == expected) >= 0.995


@pytest.mark.parametrize("source, target", [((5, 4, 6), (12, 9, 14)), ((7, 9, 8), (3, 9, 5)), ((4, 6, 5), (4, 11, 3))])
def test_separable_resize_equals_trilinear_interpolation(source, target):
    """Upsampling, downsampling, an unchanged axis: the same values as one trilinear interpolation."""
    import torch
    import torch.nn.functional as F

    logits = torch.randn(3, *source, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(logits[None], size=target, mode="trilinear", align_corners=False)[0]
    resized = npred.resize_logits(logits, target)
    assert resized.shape == (3, *target)
    torch.testing.assert_close(resized, expected, rtol=1e-6, atol=1e-6)


def test_in_place_softmax_equals_torch_softmax_for_large_logits():
    import torch

    logits = torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(0)) * 50
    logits[2, 0, 0, 0] = 1000.0  # exp overflows without the max subtracted
    expected = torch.softmax(logits, dim=0)
    result = npred.softmax_(logits)
    assert result.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(result, expected)


def test_shard_writes_exact_geometry_and_efficiency_rows(ensemble, oblique_case, model, tmp_path):
    outputs = {"obl": str(tmp_path / "obl.nii.gz"), "c0": str(tmp_path / "c0.nii.gz")}
    write = npred.cleaned_label_writer(outputs, NO_CLEANUP, LABELS)
    table = npred.predict_shard(ensemble, ["obl", "c0"], [oblique_case, model["cases"][0].image], write)
    assert list(table.columns) == EFFICIENCY_COLUMNS and table["Name"].tolist() == ["obl", "c0"]
    assert table.loc[0, "ImageSize"] == "28x30x20" and (table["Time"] > 0).all()
    source, written = sitk.ReadImage(oblique_case), sitk.ReadImage(outputs["obl"])
    assert written.GetPixelID() == sitk.sitkUInt8
    assert written.GetSize() == source.GetSize() and written.GetSpacing() == source.GetSpacing()
    assert written.GetOrigin() == source.GetOrigin() and written.GetDirection() == source.GetDirection()


def test_ensemble_of_one_model_twice_equals_the_model(ensemble, model):
    volume, geometry = read_volume(model["cases"][1].image, "c1")
    twice = npred.load_ensemble([model["model"], model["model"]], "all", "cpu", tta=True)
    single_labels, single_conf = npred.predict_volume(ensemble, volume, geometry.spacing_zyx, True)
    labels, conf = npred.predict_volume(twice, volume, geometry.spacing_zyx, True)
    np.testing.assert_array_equal(labels, single_labels)
    np.testing.assert_allclose(conf, single_conf, atol=1e-5)


def test_tta_switch_reaches_nnunet(model):
    assert npred.load_ensemble([model["model"]], "all", "cpu", tta=False).predictors[0].use_mirroring is False


def test_missing_model_is_a_clear_error(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="plans.json does not exist"):
        npred.load_ensemble([tmp_path / "nothing"], "all", "cpu", tta=True)
    with pytest.raises(FileNotFoundError, match=r"fold_0/checkpoint_final.pth does not exist"):
        npred.load_ensemble([model["model"]], 0, "cpu", tta=True)
    argv = ["--models", str(tmp_path / "nothing"), "--fold", "all", "--cases", "a", "--images", "a.nii.gz",
            "--outputs", str(tmp_path / "a.nii.gz"), "--efficiency", str(tmp_path / "e.tsv"),
            "--label-map", json.dumps(LABELS), "--postprocess", json.dumps(NO_CLEANUP)]
    with pytest.raises(SystemExit, match="error: nnU-Net model .*nothing is incomplete"):
        npred.main(argv)
    assert not (tmp_path / "e.tsv").exists()


def test_bad_image_names_case_and_file_and_writes_nothing(ensemble, tmp_path, model):
    broken = tmp_path / "broken_0000.nii.gz"
    broken.write_bytes(b"not a nifti")
    argv = ["--models", str(model["model"]), "--fold", "all", "--cases", "good", "broken",
            "--images", model["cases"][0].image, str(broken),
            "--outputs", str(tmp_path / "good.nii.gz"), str(tmp_path / "broken.nii.gz"),
            "--efficiency", str(tmp_path / "e.tsv"), "--label-map", json.dumps(LABELS),
            "--postprocess", json.dumps(NO_CLEANUP)]
    with pytest.raises(SystemExit, match=r"broken.*broken_0000\.nii\.gz"):
        npred.main(argv)
    assert not (tmp_path / "broken.nii.gz").exists() and not (tmp_path / "e.tsv").exists()
    with pytest.raises(CaseError, match="does not exist"):
        npred.predict_shard(ensemble, ["gone"], [str(tmp_path / "gone.nii.gz")], lambda *a: None)


def test_cli_writes_cleaned_predictions(model, tmp_path):
    cases = model["cases"][:2]
    outputs = [str(tmp_path / f"{c.case}.nii.gz") for c in cases]
    postprocess = {"organ": {"keep_largest": 1, "min_size_mm3": 0}, "lesion": {"keep_largest": 0, "min_size_mm3": 0}}
    npred.main(["--models", str(model["model"]), "--fold", "all", "--no-tta", "--cases", *[c.case for c in cases],
                "--images", *[c.image for c in cases], "--outputs", *outputs, "--efficiency", str(tmp_path / "e.tsv"),
                "--label-map", json.dumps(LABELS), "--postprocess", json.dumps(postprocess), "--interval", "0.01"])
    table = pd.read_csv(tmp_path / "e.tsv", sep="\t")
    assert table["Name"].tolist() == [c.case for c in cases] and set(table["MemoryKind"]) == {"rss"}
    import cc3d

    for out in outputs:
        label = sitk.GetArrayFromImage(sitk.ReadImage(out))
        for cls in (1, 3):
            if (label == cls).any():  # keep_largest 1: one component per organ
                assert cc3d.connected_components(label == cls, connectivity=26).max() == 1
