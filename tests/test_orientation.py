"""Canonical orientation: agreement with SimpleITK's DICOMOrient, exact round trips, boxes and spacing mapped back."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from workflow_scripts.io.orientation import CANONICAL, reorientation


def rotation_z(degrees: float) -> tuple[float, ...]:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


DIRECTIONS = {
    "identity": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "flipped x/y (RAS)": (-1, 0, 0, 0, -1, 0, 0, 0, 1),
    "flipped z": (1, 0, 0, 0, 1, 0, 0, 0, -1),
    "x/y swapped": (0, 1, 0, -1, 0, 0, 0, 0, 1),
    "coronal": (1, 0, 0, 0, 0, 1, 0, -1, 0),
    "all permuted, one flipped": (0, 0, 1, 1, 0, 0, 0, -1, 0),
    "oblique 30 degrees": rotation_z(30),
    "oblique 120 degrees": rotation_z(120),
}


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
def test_agrees_with_simpleitk_dicomorient(direction) -> None:
    array = np.random.default_rng(0).integers(-1000, 1000, (5, 6, 7)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetDirection(tuple(float(v) for v in direction))
    image.SetSpacing((0.7, 0.8, 2.5))
    oriented = sitk.DICOMOrient(image, CANONICAL)
    change = reorientation(direction)
    assert np.array_equal(change.to_canonical(array), sitk.GetArrayFromImage(oriented))
    assert change.spacing_zyx((2.5, 0.8, 0.7)) == pytest.approx(tuple(reversed(oriented.GetSpacing())))
    assert np.array_equal(change.from_canonical(change.to_canonical(array)), array)


def test_identity_direction_is_already_canonical() -> None:
    change = reorientation(DIRECTIONS["identity"])
    assert change.is_identity
    array = np.arange(24).reshape(2, 3, 4)
    canonical = change.to_canonical(array)
    assert np.array_equal(canonical, array) and np.shares_memory(canonical, array)  # nothing copied


def test_flipped_x_y_reverses_the_last_two_array_axes() -> None:
    change = reorientation(DIRECTIONS["flipped x/y (RAS)"])
    assert change.axes == (0, 1, 2) and change.flip == (False, True, True)


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
def test_box_of_canonical_voxels_maps_back_to_the_same_voxels(direction) -> None:
    change = reorientation(direction)
    mask = np.zeros((6, 9, 8), bool)
    mask[1:3, 2:7, 4:5] = True
    canonical = change.to_canonical(mask)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(canonical))
    back = change.box_from_canonical(box, canonical.shape)
    assert back == (slice(1, 3), slice(2, 7), slice(4, 5))


def test_degenerate_direction_is_rejected() -> None:
    with pytest.raises(ValueError, match="direction"):
        reorientation((1, 0, 0, 1, 0, 0, 0, 0, 1))
