"""Coarse-to-fine data handling: windowing, boxes and margins, crop/uncrop, label mapping, samples, augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workflow_scripts.c2f import data


def test_window_normalise_clips_and_scales_to_unit_range() -> None:
    volume = torch.tensor([-1000.0, -325.0, 0.0, 325.0, 3000.0])
    assert data.window_normalise(volume, (-325, 325)).tolist() == pytest.approx([0, 0, 0.5, 1, 1])
    assert volume[0] == -1000  # the caller's tensor is not modified


def test_model_input_accepts_integer_ct_and_resizes_to_the_grid() -> None:
    volume = torch.full((7, 30, 20), 100, dtype=torch.int16)
    out = data.model_input(volume, (-325, 325), (8, 16, 12))
    assert out.shape == (1, 1, 8, 16, 12) and out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(out, 425 / 650))


def test_margin_in_mm_is_honoured_for_anisotropic_spacing() -> None:
    # 20 mm is 25 voxels at 0.8 mm in-plane but only 4 slices at 5 mm
    assert data.margin_voxels(20, (5.0, 0.8, 0.8)) == (4, 25, 25)
    # never smaller than asked: 20 mm at 3 mm spacing needs 7 voxels (21 mm), not 6 (18 mm)
    assert data.margin_voxels(20, (3.0, 3.0, 3.0)) == (7, 7, 7)
    assert data.margin_voxels(0, (2.0, 1.0, 1.0)) == (0, 0, 0)


@settings(max_examples=50, deadline=None)
@given(margin=st.floats(0, 60), spacing=st.tuples(*[st.floats(0.3, 6.0)] * 3))
def test_margin_voxels_cover_at_least_the_physical_margin(margin: float, spacing: tuple) -> None:
    voxels = data.margin_voxels(margin, spacing)
    for n, s in zip(voxels, spacing):
        assert n * s >= margin - 1e-6
        assert (n - 1) * s < margin + 1e-6


def test_expanded_box_with_anisotropic_margin_clips_at_the_border() -> None:
    box = (slice(2, 5), slice(40, 60), slice(0, 10))
    margin = data.margin_voxels(20, (5.0, 0.8, 0.8))
    grown = data.expand_box(box, margin, margin, (30, 100, 100))
    assert grown == (slice(0, 9), slice(15, 85), slice(0, 35))


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(*[st.integers(4, 40)] * 3), coarse=st.tuples(*[st.integers(4, 16)] * 3), data_=st.data())
def test_scaled_box_covers_every_voxel_that_maps_into_the_coarse_box(shape, coarse, data_) -> None:
    starts = [data_.draw(st.integers(0, c - 1)) for c in coarse]
    stops = [data_.draw(st.integers(s + 1, c)) for s, c in zip(starts, coarse)]
    box = tuple(slice(a, b) for a, b in zip(starts, stops))
    full = data.scale_box(box, coarse, shape)
    for axis, (s, c, n) in enumerate(zip(box, coarse, shape)):
        assert 0 <= full[axis].start < full[axis].stop <= n
        # original voxels whose centre falls into the coarse box's extent are inside the scaled box
        centres = (np.arange(n) + 0.5) * c / n
        inside = np.flatnonzero((centres >= s.start) & (centres < s.stop))
        assert inside.size == 0 or (full[axis].start <= inside.min() and inside.max() < full[axis].stop)


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(*[st.integers(1, 12)] * 3), data_=st.data())
def test_crop_uncrop_round_trip_restores_the_volume_inside_the_box(shape, data_) -> None:
    volume = torch.from_numpy(np.random.default_rng(0).integers(1, 100, shape).astype(np.int16))
    starts = [data_.draw(st.integers(0, n - 1)) for n in shape]
    box = tuple(slice(a, data_.draw(st.integers(a + 1, n))) for a, n in zip(starts, shape))
    restored = data.uncrop(volume[box], box, shape)
    assert restored.shape == volume.shape and restored.dtype == volume.dtype
    assert torch.equal(restored[box], volume[box])
    outside = torch.ones(shape, dtype=torch.bool)
    outside[box] = False
    assert (restored[outside] == 0).all()


def test_uncrop_rejects_a_crop_that_does_not_fit_its_box() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        data.uncrop(torch.zeros(2, 2, 2), (slice(0, 3), slice(0, 2), slice(0, 2)), (4, 4, 4))


def test_labels_map_to_contiguous_class_indices_with_ignore() -> None:
    lookup = data.label_lookup([0, 1, 5, 14], ignore_label=15)
    label = np.array([[[0, 1, 5, 14, 15]]], dtype=np.int16)
    assert data.to_class_indices(label, lookup).tolist() == [[[0, 1, 2, 3, data.IGNORE_INDEX]]]
    with pytest.raises(ValueError, match=r"\[7\]"):
        data.to_class_indices(np.array([[[0, 7]]]), lookup)


def _prepared(label: np.ndarray, spacing=(2.0, 1.0, 1.0)) -> data.PreparedCase:
    image = np.where(label > 0, 200, -100).astype(np.int16)
    return data.prepare_case(image, label, spacing, (-325, 325), (8, 8, 8), max_margin_mm=4)


def test_prepared_case_keeps_the_foreground_plus_the_largest_training_margin() -> None:
    label = np.zeros((20, 30, 30), np.uint8)
    label[8:10, 10:12, 14:16] = 1
    case = _prepared(label)
    # 4 mm is 2 slices at 2 mm and 4 voxels at 1 mm
    assert case.region_label.shape == (2 + 4, 2 + 8, 2 + 8)
    assert case.foreground.tolist() == [[2, 4], [4, 6], [4, 6]]
    assert case.coarse_image.shape == case.coarse_label.shape == (8, 8, 8)
    assert case.region_image.dtype == np.float16 and 0 <= case.region_image.min() <= case.region_image.max() <= 1


def test_empty_label_uses_the_whole_volume() -> None:
    case = _prepared(np.zeros((6, 7, 8), np.uint8))
    assert case.region_label.shape == (6, 7, 8)
    assert case.foreground.tolist() == [[0, 6], [0, 7], [0, 8]]


def test_prepared_case_round_trips_through_its_file(tmp_path) -> None:
    label = np.zeros((10, 10, 10), np.uint8)
    label[3:6, 3:6, 3:6] = 2
    case = _prepared(label)
    path = tmp_path / "case.npz"
    case.save(path)
    loaded = data.PreparedCase.load(path)
    for key, value in case.__dict__.items():
        np.testing.assert_array_equal(getattr(loaded, key), value)


def test_random_fine_samples_contain_the_foreground_and_have_the_fine_shape() -> None:
    label = np.zeros((20, 40, 40), np.uint8)
    label[8:12, 15:25, 18:22] = 1
    case = _prepared(label)
    rng = np.random.default_rng(1)
    for _ in range(10):
        image, sample_label = data.random_fine_sample(case, (8, 16, 16), 4, rng)
        assert image.shape == sample_label.shape == (1, 8, 16, 16)
        assert sample_label.dtype == torch.uint8 and (sample_label == 1).any()
    box = data.fine_crop_box(case, (0, 0, 0), (4, 4, 4))
    assert data.box_shape(box) == (4 + 2, 10 + 4, 4 + 4)


def test_augmentation_keeps_shapes_and_label_values() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    pipeline = data.augmentation_pipeline((8, 16, 16))
    image = torch.rand(1, 8, 16, 16)
    label = torch.zeros(1, 8, 16, 16, dtype=torch.uint8)
    label[0, 2:6, 4:12, 4:12] = 3
    label[0, 0, 0, 0] = data.IGNORE_INDEX
    changed = False
    for _ in range(30):
        out_image, out_label = data.augment(pipeline, image.clone(), label.clone())
        assert out_image.shape == image.shape and out_label.shape == label.shape
        assert out_label.dtype == torch.uint8
        assert set(out_label.unique().tolist()) <= {0, 3, data.IGNORE_INDEX}
        changed |= not torch.equal(out_image, image)
    assert changed
