"""FLARE DSC/NSD: hand-computed boxes and shifts, the empty-mask rules, tolerances, the official quirks, and agreement
with DeepMind's reference implementation (the code the official FLARE script runs)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from surface_distance import lookup_tables as reference_tables
from surface_distance import metrics as reference

from workflow_scripts.evaluation.metrics import (
    ClassSpec,
    case_metrics,
    class_metrics,
    class_specs,
    dice,
    neighbour_codes,
    surface_distances,
    surfel_area_table,
)


def box(shape, lo, hi) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def box_surface_area(n, s) -> float:
    """Surfel area of an n0 x n1 x n2 voxel box: flat faces, edge quads (half-diagonal wide), corner triangles."""
    (n0, n1, n2), (s0, s1, s2) = n, s
    faces = 2 * ((n1 - 1) * (n2 - 1) * s1 * s2 + (n0 - 1) * (n2 - 1) * s0 * s2 + (n0 - 1) * (n1 - 1) * s0 * s1)
    edges = 2 * ((n0 - 1) * s0 * math.hypot(s1, s2) + (n1 - 1) * s1 * math.hypot(s0, s2)
                 + (n2 - 1) * s2 * math.hypot(s0, s1))
    corners = math.sqrt((s1 * s2) ** 2 + (s0 * s2) ** 2 + (s0 * s1) ** 2)
    return faces + edges + corners


def shifted_box_nsd(n, s) -> float:
    """NSD of a box against itself shifted by one voxel along axis 0, with a tolerance below every spacing.

    Only border corners shared by both surfaces count: n0 - 1 wall layers of the side ring plus one edge ring
    (top edges of one box, bottom edges of the other), the same area on both sides.
    """
    (n0, n1, n2), (s0, s1, s2) = n, s
    wall_layer = 2 * s0 * ((n2 - 1) * s2 + (n1 - 1) * s1 + math.hypot(s1, s2))
    edge_ring = ((n1 - 1) * s1 * math.hypot(s0, s2) + (n2 - 1) * s2 * math.hypot(s0, s1)
                 + 0.5 * math.sqrt((s1 * s2) ** 2 + (s0 * s2) ** 2 + (s0 * s1) ** 2))
    return ((n0 - 1) * wall_layer + edge_ring) / box_surface_area(n, s)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.8, 0.7), (0.5, 3.0, 1.5)])
def test_box_surface_area_matches_hand_formula(spacing):
    n = (4, 6, 5)
    mask = box((8, 10, 9), (2, 2, 2), (6, 8, 7))
    distances = surface_distances(mask, mask, spacing)
    assert distances.areas_gt.sum() == pytest.approx(box_surface_area(n, spacing), rel=1e-12)
    assert np.all(distances.gt_to_pred == 0)


def test_single_voxel_is_eight_corner_triangles():
    mask = box((3, 3, 3), (1, 1, 1), (2, 2, 2))
    s = (2.0, 1.0, 0.5)
    expected = math.sqrt((1.0 * 0.5) ** 2 + (2.0 * 0.5) ** 2 + (2.0 * 1.0) ** 2)  # 8 triangles of 1/8 each
    assert surface_distances(mask, mask, s).areas_gt.sum() == pytest.approx(expected)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_one_voxel_shift_with_anisotropic_spacing(axis):
    n = [5, 6, 7]
    s = [3.0, 3.0, 3.0]
    s[axis] = 1.0  # the shift costs 1 mm; every other surface point is >= 3 mm away
    lo = [2, 2, 2]
    gt = box((12, 12, 12), lo, [a + b for a, b in zip(lo, n)])
    pred = np.roll(gt, 1, axis=axis)
    order = [axis] + [a for a in range(3) if a != axis]
    expected_nsd = shifted_box_nsd([n[a] for a in order], [s[a] for a in order])
    dsc, nsd = class_metrics(gt, pred, s, tolerance_mm=0.5)
    assert dsc == pytest.approx((n[axis] - 1) / n[axis])
    assert nsd == pytest.approx(expected_nsd, rel=1e-12)
    # a tolerance reaching the shift accepts every surface point; one just below it does not
    assert class_metrics(gt, pred, s, tolerance_mm=1.0)[1] == pytest.approx(1.0)
    assert class_metrics(gt, pred, s, tolerance_mm=0.999)[1] == pytest.approx(expected_nsd, rel=1e-12)


def test_empty_mask_rules():
    empty = np.zeros((5, 5, 5), bool)
    full = box((5, 5, 5), (1, 1, 1), (3, 3, 3))
    assert class_metrics(empty, empty, (1, 1, 1), 2) == (1.0, 1.0)
    assert class_metrics(empty, full, (1, 1, 1), 2) == (0.0, 0.0)
    assert class_metrics(full, empty, (1, 1, 1), 2) == (0.0, 0.0)
    gt = np.zeros((5, 5, 5), np.uint8)
    gt[full] = 1
    scores = case_metrics(gt, np.zeros_like(gt), (1, 1, 1), [ClassSpec(1, 2), ClassSpec(2, 2)])
    assert scores == {1: (0.0, 0.0), 2: (1.0, 1.0)}
    assert case_metrics(np.zeros_like(gt), gt, (1, 1, 1), [ClassSpec(1, 2)]) == {1: (0.0, 0.0)}


def test_per_class_tolerances():
    gt = np.zeros((16, 16, 16), np.uint8)
    gt[box(gt.shape, (1, 1, 1), (6, 6, 6))] = 1
    gt[box(gt.shape, (8, 8, 8), (13, 13, 13))] = 2
    pred = np.roll(gt, 1, axis=0)
    spacing = (2.0, 3.0, 3.0)
    scores = case_metrics(gt, pred, spacing, [ClassSpec(1, 2.0), ClassSpec(2, 1.0)])
    assert scores[1][1] == pytest.approx(1.0)
    assert scores[2][1] == pytest.approx(shifted_box_nsd((5, 5, 5), spacing))
    assert scores[1][0] == scores[2][0] == pytest.approx(0.8)


def test_class_specs_from_config_labels():
    labels = [{"id": 1, "name": "Liver", "kind": "organ", "nsd_tolerance_mm": 5},
              {"id": 5, "name": "Aorta", "kind": "organ", "nsd_tolerance_mm": 2}]
    assert class_specs(labels, [5]) == [ClassSpec(1, 5.0, False), ClassSpec(5, 2.0, True)]
    with pytest.raises(ValueError, match="Liver"):
        class_specs([{"id": 1, "name": "Liver", "kind": "organ"}])


def test_nsd_zero_below_dsc_quirk():
    gt = box((10, 10, 10), (1, 1, 1), (5, 5, 5))
    pred = box((10, 10, 10), (4, 4, 4), (8, 8, 8))  # one voxel of overlap: DSC 2/128
    dsc, nsd = class_metrics(gt, pred, (1, 1, 1), 3.0)
    assert dsc == pytest.approx(2 / 128) and nsd > 0
    assert class_metrics(gt, pred, (1, 1, 1), 3.0, nsd_zero_below_dsc=0.1) == (dsc, 0.0)
    assert class_metrics(gt, pred, (1, 1, 1), 3.0, nsd_zero_below_dsc=0.01) == (dsc, nsd)


def test_tubular_z_crop_quirk_leaves_out_the_last_slice():
    gt = np.zeros((12, 8, 8), np.uint8)
    pred = np.zeros_like(gt)
    gt[3:8, 2:6, 2:6] = 5  # slices 3..7
    pred[0:12, 3:6, 2:6] = 5
    spacing = (2.0, 1.0, 1.0)
    cropped = case_metrics(gt, pred, spacing, [ClassSpec(5, 2.0, z_crop=True)])[5]
    assert cropped == class_metrics(gt[3:7] == 5, pred[3:7] == 5, spacing, 2.0)
    assert cropped != case_metrics(gt, pred, spacing, [ClassSpec(5, 2.0)])[5]
    single = np.zeros_like(gt)
    single[4, 2:6, 2:6] = 5
    assert all(math.isnan(v) for v in case_metrics(single, pred, spacing, [ClassSpec(5, 2.0, z_crop=True)])[5])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        case_metrics(np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 3), np.uint8), (1, 1, 1), [ClassSpec(1, 1)])


def test_neighbour_codes_of_one_voxel():
    codes = neighbour_codes(np.ones((1, 1, 1), bool))
    # the voxel is the (1,1,1) neighbour of corner (0,0,0) (bit 0) ... and the (0,0,0) neighbour of corner (1,1,1)
    assert codes[0, 0, 0] == 1 and codes[1, 1, 1] == 128 and codes[0, 1, 1] == 8 and codes[1, 0, 0] == 16


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 1.3, 2.9), (5.0, 0.78125, 0.78125), (0.31, 4.2, 1.7)])
def test_surfel_area_table_equals_reference(spacing):
    assert np.allclose(surfel_area_table(spacing), reference_tables.create_table_neighbour_code_to_surface_area(spacing),
                       rtol=0, atol=1e-12)


def random_blob(rng: np.random.Generator, shape, threshold: float) -> np.ndarray:
    return ndimage.gaussian_filter(rng.random(shape), 1.5) > threshold


@pytest.mark.parametrize("seed", range(12))
def test_agrees_with_reference_on_random_blobs(seed):
    """Like the official script: nibabel arrays are (x, y, z), i.e. ours transposed, with the spacing reversed."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(6, 30, 3))
    spacing = tuple(float(v) for v in rng.uniform(0.3, 4.0, 3))
    gt, pred = random_blob(rng, shape, 0.5), random_blob(rng, shape, rng.uniform(0.48, 0.52))
    if not gt.any() or not pred.any():
        pytest.skip("degenerate draw")
    distances = reference.compute_surface_distances(gt.T.copy(), pred.T.copy(), spacing[::-1])
    for tolerance in (0.5, 1.0, 2.0, 3.0, 7.0):
        dsc, nsd = class_metrics(gt, pred, spacing, tolerance)
        assert nsd == pytest.approx(reference.compute_surface_dice_at_tolerance(distances, tolerance), abs=1e-9)
        assert dsc == pytest.approx(reference.compute_dice_coefficient(gt, pred), abs=1e-12)


def test_multi_class_case_agrees_with_reference():
    """All classes from one call, cropped per class, against full-volume reference runs per class."""
    rng = np.random.default_rng(42)
    shape, spacing = (24, 40, 36), (2.5, 0.8, 0.8)
    gt = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for cls in range(1, 6):
        centre = rng.integers(6, np.array(shape) - 6)
        lo, hi = centre - rng.integers(2, 6, 3), centre + rng.integers(2, 6, 3)
        gt[box(shape, lo, hi)] = cls
        pred[box(shape, lo + rng.integers(-1, 2, 3), hi + rng.integers(-1, 2, 3))] = cls
    specs = [ClassSpec(c, t) for c, t in zip(range(1, 6), (5, 3, 2, 7, 2))]
    ours = case_metrics(gt, pred, spacing, specs)
    for spec in specs:
        g, p = gt == spec.id, pred == spec.id
        distances = reference.compute_surface_distances(g.T.copy(), p.T.copy(), spacing[::-1])
        assert ours[spec.id][1] == pytest.approx(
            reference.compute_surface_dice_at_tolerance(distances, spec.tolerance_mm), abs=1e-9)
        assert ours[spec.id][0] == pytest.approx(dice(g, p))
