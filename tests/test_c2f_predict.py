"""Coarse-to-fine inference: both stages on anisotropic volumes, the coarse box and its mm margin, the empty-coarse
fallback, component cleanup (organs largest, lesions all above a size), exact output geometry, the shard CLI."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from conftest import LABELS, POSTPROCESS
from workflow_scripts.c2f import predict
from workflow_scripts.evaluation.efficiency import EFFICIENCY_COLUMNS
from workflow_scripts.c2f.model import StudentSpec, save_model
from workflow_scripts.labels.postprocess import rules_from_config
from workflow_scripts.io.volumes import Geometry, read_label, write_volume

RULES = rules_from_config(POSTPROCESS, LABELS)
C2F = {"window": [-325, 325], "coarse_size": [8, 12, 12], "fine_size": [12, 24, 20], "coarse_channels": [4, 8],
       "channels": [4, 8], "inplane_pool_levels": 1}


class FixedLabelNet(nn.Module):
    """Stands in for a trained network: always 'predicts' one class-index map, resized to the input grid."""

    def __init__(self, indices: np.ndarray, n_classes: int = 4) -> None:
        super().__init__()
        self.register_buffer("indices", torch.from_numpy(indices.astype(np.int64)))
        self.n_classes = n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices = nn.functional.interpolate(self.indices[None, None].float(), size=x.shape[2:], mode="nearest")
        return nn.functional.one_hot(indices[0, 0].long(), self.n_classes).movedim(-1, 0)[None].float()


def fake_student(coarse: np.ndarray, fine: np.ndarray) -> predict.Student:
    spec = StudentSpec((0, 1, 2, 3), (-325.0, 325.0), coarse.shape, fine.shape, (4, 8), (4, 8), 1)
    return predict.Student(spec, FixedLabelNet(coarse), FixedLabelNet(fine), torch.device("cpu"), "none")


def random_student(tmp_path) -> predict.Student:
    torch.manual_seed(0)
    spec = StudentSpec.from_config(C2F, [1, 2, 3])
    path = tmp_path / "model.pt"
    save_model(path, spec, *spec.build())
    return predict.Student.load(path, "cpu", "none")


@pytest.mark.parametrize("shape,spacing", [((9, 37, 23), (5.0, 0.8, 0.7)), ((40, 16, 18), (0.5, 2.0, 2.0))])
def test_both_stages_run_on_anisotropic_volumes_and_return_the_input_grid(tmp_path, shape, spacing) -> None:
    student = random_student(tmp_path)
    volume = np.random.default_rng(0).integers(-1000, 1000, shape).astype(np.int16)
    labels, _ = predict.segment(student, volume, spacing, 20, RULES)
    assert labels.shape == shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2, 3}


def test_box_is_the_coarse_foreground_on_the_full_grid_plus_the_margin_in_mm() -> None:
    coarse = np.zeros((10, 20, 20), np.uint8)
    coarse[4:6, 8:12, 8:12] = 1
    fine = np.ones((8, 8, 8), np.uint8)  # everything is organ 1 inside the crop
    student = fake_student(coarse, fine)
    volume = np.zeros((20, 40, 40), np.int16)
    labels, box = predict.segment(student, volume, (5.0, 1.0, 1.0), 10, RULES)
    # coarse [4:6, 8:12, 8:12] is [8:12, 16:24, 16:24] on the full grid; 10 mm = 2 slices at 5 mm, 10 voxels at 1 mm
    assert box == (slice(6, 14), slice(6, 34), slice(6, 34))
    inside = np.zeros(volume.shape, bool)
    inside[box] = True
    assert (labels[inside] == 1).all() and (labels[~inside] == 0).all()


class ScaledNet(FixedLabelNet):
    """A FixedLabelNet whose logits are scaled: a known max softmax probability per stage."""

    def __init__(self, indices: np.ndarray, scale: float) -> None:
        super().__init__(indices)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


def test_confidence_map_is_the_fine_stages_inside_its_box_and_the_coarse_stages_outside(tmp_path) -> None:
    """Pseudo-labels of a later round (README, "Rounds") come from the student: its confidence map is encoded as the
    teacher's (round(255 * max softmax probability)), so merge.min_confidence means the same for both."""
    coarse = np.zeros((10, 20, 20), np.uint8)
    coarse[4:6, 8:12, 8:12] = 1
    spec = StudentSpec((0, 1, 2, 3), (-325.0, 325.0), coarse.shape, (8, 8, 8), (4, 8), (4, 8), 1)
    student = predict.Student(spec, ScaledNet(coarse, 1.0), ScaledNet(np.ones((8, 8, 8), np.uint8), 4.0),
                              torch.device("cpu"), "none")
    volume = np.zeros((20, 40, 40), np.int16)
    labels, box, confidence = predict.segment_with_confidence(student, volume, (5.0, 1.0, 1.0), 10, RULES)
    assert np.array_equal(labels, predict.segment(student, volume, (5.0, 1.0, 1.0), 10, RULES)[0])
    assert confidence.shape == volume.shape and confidence.dtype == np.uint8
    inside = np.zeros(volume.shape, bool)
    inside[box] = True
    # one-hot logits times s over 4 classes: max softmax probability e^s / (e^s + 3)
    assert (confidence[inside] == round(255 * np.e ** 4 / (np.e ** 4 + 3))).all()
    assert (confidence[~inside] == round(255 * np.e / (np.e + 3))).all()
    assert predict.segment_with_confidence(student, volume, (5.0, 1.0, 1.0), 10, RULES, False)[2] is None


def test_cli_writes_confidence_maps_with_the_input_geometry_when_asked(tmp_path) -> None:
    random_student(tmp_path)
    image = _write_case(tmp_path, "a")
    output, confidence = tmp_path / "a.nii.gz", tmp_path / "a_confidence.nii.gz"
    predict.main(_cli_args(tmp_path, ["a"], [image], [str(output)]) + ["--confidences", str(confidence)])
    written, source = sitk.ReadImage(str(confidence)), sitk.ReadImage(image)
    assert written.GetPixelID() == sitk.sitkUInt8 and Geometry.of(written) == Geometry.of(source)
    assert sitk.GetArrayFromImage(written).max() > 0
    with pytest.raises(SystemExit):  # one confidence map per case
        predict.main(_cli_args(tmp_path, ["a"], [image], [str(output)]) + ["--confidences", "x", "y"])


def test_empty_coarse_prediction_falls_back_to_the_whole_volume() -> None:
    fine = np.zeros((6, 12, 12), np.uint8)
    fine[1:5, 2:6, 2:6] = 2
    student = fake_student(np.zeros((4, 4, 4), np.uint8), fine)
    labels, box = predict.segment(student, np.full((6, 12, 12), -50, np.int16), (2.0, 1.0, 1.0), 20, RULES)
    assert box is None
    assert np.array_equal(labels, fine)


def test_cleanup_keeps_every_lesion_above_the_minimum_size_but_only_the_largest_organ_part() -> None:
    fine = np.zeros((10, 30, 30), np.uint8)
    fine[1:5, 1:10, 1:10] = 1  # organ, main part
    fine[7:9, 25:27, 25:27] = 1  # organ, stray island: removed
    fine[6:9, 2:6, 2:6] = 3  # lesion 48 voxels
    fine[1:3, 20:23, 2:5] = 3  # second lesion 18 voxels: kept (lesions are not "largest only")
    fine[8, 14, 14] = 3  # single-voxel lesion, 2 mm^3 < 10 mm^3: removed
    student = fake_student(np.zeros((4, 4, 4), np.uint8), fine)
    labels, _ = predict.segment(student, np.zeros(fine.shape, np.int16), (2.0, 1.0, 1.0), 20, RULES)
    expected = fine.copy()
    expected[7:9, 25:27, 25:27] = 0
    expected[8, 14, 14] = 0
    assert np.array_equal(labels, expected)


def test_output_has_the_exact_input_geometry(tmp_path) -> None:
    student = random_student(tmp_path)
    image = sitk.GetImageFromArray(np.random.default_rng(1).integers(-200, 200, (11, 26, 19)).astype(np.int16))
    image.SetSpacing((0.78125, 0.8125, 3.75))
    image.SetOrigin((-171.3, 12.25, -402.5))
    image.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    sitk.WriteImage(image, str(tmp_path / "case_0000.nii.gz"))
    size, _ = predict.predict_case(student, "case", str(tmp_path / "case_0000.nii.gz"), str(tmp_path / "out.nii.gz"),
                                20, RULES)
    out = sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    image = sitk.ReadImage(str(tmp_path / "case_0000.nii.gz"))  # as stored (NIfTI keeps float32 placement)
    assert size == "19x26x11"
    assert out.GetSize() == image.GetSize() and out.GetSpacing() == image.GetSpacing()
    assert out.GetOrigin() == image.GetOrigin() and out.GetDirection() == image.GetDirection()
    assert out.GetPixelID() == sitk.sitkUInt8


def _write_case(folder, case: str, shape=(8, 20, 16)) -> str:
    path = folder / f"{case}_0000.nii.gz"
    geometry = Geometry(tuple(reversed(shape)), (0.9, 0.9, 2.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_volume(path, np.random.default_rng(2).integers(-300, 300, shape).astype(np.int16), geometry)
    return str(path)


def _cli_args(tmp_path, cases, images, outputs) -> list[str]:
    return ["--model", str(tmp_path / "model.pt"), "--cases", *cases, "--images", *images, "--outputs", *outputs,
            "--efficiency", str(tmp_path / "eff.tsv"), "--boxes", str(tmp_path / "boxes.tsv"),
            "--label-map", json.dumps(LABELS),
            "--postprocess", json.dumps(POSTPROCESS), "--margin-mm", "20", "--interval", "0.01"]


def test_cli_predicts_a_shard_and_writes_one_efficiency_row_per_case(tmp_path) -> None:
    random_student(tmp_path)
    cases = ["a", "b"]
    images = [_write_case(tmp_path, "a"), _write_case(tmp_path, "b", (12, 16, 24))]
    outputs = [str(tmp_path / "pred" / f"{c}.nii.gz") for c in cases]
    predict.main(_cli_args(tmp_path, cases, images, outputs))
    for image, output in zip(images, outputs):
        assert read_label(output, "x")[1] == read_label(image, "x")[1]
    table = pd.read_csv(tmp_path / "eff.tsv", sep="\t")
    assert list(table.columns) == EFFICIENCY_COLUMNS
    assert table["Name"].tolist() == cases and table["ImageSize"].tolist() == ["16x20x8", "24x16x12"]
    assert (table["Time"] > 0).all() and (table["MaxGPU_Mem"] > 0).all()
    assert (table["MemoryKind"] == "rss").all()
    boxes = pd.read_csv(tmp_path / "boxes.tsv", sep="\t")
    assert list(boxes.columns) == predict.BOX_COLUMNS and boxes["case"].tolist() == cases
    for row, shape in zip(boxes.itertuples(), [(8, 20, 16), (12, 16, 24)]):  # a box, or empty: the whole volume
        if pd.notna(row.z0):
            assert 0 <= row.z0 < row.z1 <= shape[0] and 0 <= row.y0 < row.y1 <= shape[1]
            assert 0 <= row.x0 < row.x1 <= shape[2]


def test_cli_names_an_unreadable_case_and_writes_no_table(tmp_path) -> None:
    random_student(tmp_path)
    good = _write_case(tmp_path, "good")
    bad = tmp_path / "bad_0000.nii.gz"
    bad.write_bytes(b"\x1f\x8b truncated")
    outputs = [str(tmp_path / "good.nii.gz"), str(tmp_path / "bad.nii.gz")]
    with pytest.raises(SystemExit, match=r"'bad'.*bad_0000\.nii\.gz"):
        predict.main(_cli_args(tmp_path, ["good", "bad"], [good, str(bad)], outputs))
    assert not (tmp_path / "bad.nii.gz").exists() and not (tmp_path / "eff.tsv").exists()


def test_cli_rejects_mismatched_argument_lists(tmp_path) -> None:
    with pytest.raises(SystemExit):
        predict.main(_cli_args(tmp_path, ["a", "b"], ["a.nii.gz"], ["a_out.nii.gz"]))


# --- orientation ---------------------------------------------------------------------------------------------------

def _asymmetric_scan(shape=(12, 30, 26)) -> sitk.Image:
    """A CT-like volume with structures at different places left/right and front/back (identity direction)."""
    rng = np.random.default_rng(4)
    z, y, x = np.indices(shape)
    array = rng.normal(-100, 15, shape)
    array[((y - 9) / 5) ** 2 + ((x - 7) / 4) ** 2 < 1] += 250
    array[((y - 20) / 4) ** 2 + ((x - 18) / 6) ** 2 + ((z - 6) / 4) ** 2 < 1] += 400
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing((1.4, 1.2, 3.0))
    image.SetOrigin((-20.0, 35.5, -110.25))
    return image


@pytest.mark.parametrize("orientation", ["RAS", "PLS"], ids=["flipped x/y", "x/y swapped"])
def test_same_scan_stored_in_another_orientation_gets_the_same_prediction_in_physical_space(tmp_path,
                                                                                            orientation) -> None:
    """A scan and a copy with flipped (or permuted) direction cosines are the same physical image: the student must
    segment them identically, which it only does by seeing both in one canonical orientation."""
    student = random_student(tmp_path)
    scan = _asymmetric_scan()
    copy = sitk.DICOMOrient(scan, orientation)
    if orientation == "RAS":
        assert copy.GetDirection() == (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    assert not np.array_equal(sitk.GetArrayFromImage(copy), sitk.GetArrayFromImage(scan))  # other voxel order
    for name, image in (("scan", scan), ("copy", copy)):
        sitk.WriteImage(image, str(tmp_path / f"{name}_0000.nii.gz"))
        predict.predict_case(student, name, str(tmp_path / f"{name}_0000.nii.gz"), str(tmp_path / f"{name}.nii.gz"),
                             20, RULES)
    scan_pred = sitk.ReadImage(str(tmp_path / "scan.nii.gz"))
    copy_pred = sitk.ReadImage(str(tmp_path / "copy.nii.gz"))
    stored_copy = sitk.ReadImage(str(tmp_path / "copy_0000.nii.gz"))
    assert copy_pred.GetDirection() == stored_copy.GetDirection() and copy_pred.GetOrigin() == stored_copy.GetOrigin()
    # the copy's prediction sampled on the scan's voxel grid (nearest neighbour: the voxel centres coincide)
    on_scan_grid = sitk.Resample(copy_pred, scan_pred, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    expected = sitk.GetArrayFromImage(scan_pred)
    assert len(np.unique(expected)) > 1  # a non-trivial segmentation, so the comparison means something
    assert np.array_equal(sitk.GetArrayFromImage(on_scan_grid), expected)


@pytest.mark.parametrize("size", [(7, 13, 5), (16, 16, 16), (4, 4, 4)])
def test_the_fine_stage_is_resized_as_logits_and_decided_on_the_scans_grid(size) -> None:
    """resized_argmax (class by class, running maximum) equals resizing all logits at once and taking the argmax and
    the max softmax probability there, up, down or mixed."""
    logits = torch.randn(1, 5, 8, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    indices, confidence = predict.resized_argmax(logits, size, with_confidence=True)
    resized = torch.nn.functional.interpolate(logits, size=size, mode="trilinear", align_corners=False)[0]
    assert indices.dtype == torch.uint8 and tuple(indices.shape) == size
    assert torch.equal(indices, resized.argmax(0).to(torch.uint8))
    expected = torch.round(torch.softmax(resized, 0).amax(0) * 255).to(torch.uint8)
    assert (confidence.int() - expected.int()).abs().max() <= 1
    assert torch.equal(predict.resized_argmax(logits, size)[0], indices)
    assert predict.resized_argmax(logits, size)[1] is None


def test_a_boundary_between_fine_voxels_lands_where_the_logits_cross_not_on_a_nearest_voxel() -> None:
    """Upsampling 4 -> 8 voxels along x: class 1's logit margin crosses zero at fine x = 1.91, i.e. output x = 4.32
    (x_out = 2 * x_in + 0.5), so output voxel 4 is still class 0; nearest-neighbour resizing of the fine labels
    (0, 0, 1, 1) would give it class 1."""
    ramp = torch.tensor([-3.0, -2.0, 0.2, 4.0])
    logits = torch.zeros(1, 2, 1, 1, 4)
    logits[0, 1, 0, 0] = ramp
    indices, _ = predict.resized_argmax(logits, (1, 1, 8))
    assert indices[0, 0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    nearest = predict.data.resize_labels(logits.argmax(1)[0].to(torch.uint8), (1, 1, 8))
    assert nearest[0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
