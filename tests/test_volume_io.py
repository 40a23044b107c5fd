"""Geometry round trips, atomic writes and the error messages of the shared volume I/O."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from workflow_scripts.io.volumes import (
    CaseError,
    Geometry,
    atomic_path,
    foreground_box,
    read_label,
    read_volume,
    validate_case_id,
    write_text,
    write_volume,
)

GEOMETRY = Geometry(size=(6, 5, 4), spacing=(0.8, 0.7, 2.5), origin=(-100.5, 20.25, 3.0),
                    direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))


def test_write_then_read_keeps_geometry_and_values(tmp_path: Path) -> None:
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = tmp_path / "case_0000.nii.gz"
    write_volume(path, array, GEOMETRY)
    back, geometry = read_volume(path, "case")
    np.testing.assert_array_equal(back, array)
    assert geometry.size == GEOMETRY.size
    np.testing.assert_allclose(geometry.spacing, GEOMETRY.spacing)
    np.testing.assert_allclose(geometry.origin, GEOMETRY.origin)
    np.testing.assert_allclose(geometry.direction, GEOMETRY.direction, atol=1e-7)
    assert geometry.spacing_zyx == pytest.approx((2.5, 0.7, 0.8))
    assert geometry.voxel_volume_mm3 == pytest.approx(0.8 * 0.7 * 2.5)
    assert list(tmp_path.iterdir()) == [path], "no temporary file may be left behind"


def test_shape_mismatch_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not match geometry"):
        write_volume(tmp_path / "x.nii.gz", np.zeros((2, 2, 2), np.uint8), GEOMETRY)
    assert not list(tmp_path.iterdir())


def test_atomic_path_leaves_no_output_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.tsv"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert not list(tmp_path.iterdir())
    write_text(target, "whole\n")
    assert target.read_text() == "whole\n"


def test_missing_and_corrupt_files_name_case_and_file(tmp_path: Path) -> None:
    with pytest.raises(CaseError, match=r"case 'c1' \(file .*nope.nii.gz\): file does not exist"):
        read_volume(tmp_path / "nope.nii.gz", "c1")
    corrupt = tmp_path / "bad.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(CaseError, match=r"case 'c2' \(file .*bad.nii.gz\): cannot be read"):
        read_volume(corrupt, "c2")


def test_non_3d_and_float_labels_are_rejected(tmp_path: Path) -> None:
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4), np.int16)), str(flat))
    with pytest.raises(CaseError, match="expected a 3D volume, found 2D"):
        read_volume(flat, "c3")
    floats = tmp_path / "float.nii.gz"
    write_volume(floats, np.full((4, 5, 6), 0.5, np.float32), GEOMETRY)
    with pytest.raises(CaseError, match="integer voxel type"):
        read_label(floats, "c4")


def test_case_error_survives_pickling() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(CaseError("c9", "/x/c9.nii.gz", "broken")))
    assert (error.case, error.path, error.reason) == ("c9", "/x/c9.nii.gz", "broken")
    assert str(error) == "case 'c9' (file /x/c9.nii.gz): broken"


@pytest.mark.parametrize("bad", ["with space", "a/b", "../up", ".hidden", "tab\tid", "", "trailing\n"])
def test_bad_case_ids_are_rejected(bad: str) -> None:
    with pytest.raises(CaseError, match="invalid case id"):
        validate_case_id(bad)


def test_geometry_mismatch_reports_first_difference() -> None:
    assert GEOMETRY.mismatch(GEOMETRY) is None
    moved = Geometry(GEOMETRY.size, GEOMETRY.spacing, (0.0, 0.0, 0.0), GEOMETRY.direction)
    assert GEOMETRY.mismatch(moved).startswith("origin")
    finer = Geometry(GEOMETRY.size, (0.8, 0.7, 2.0), GEOMETRY.origin, GEOMETRY.direction)
    assert GEOMETRY.mismatch(finer).startswith("spacing")


@pytest.mark.parametrize("dtype", [np.uint8, bool, np.int16])
def test_foreground_box_is_tight_and_none_when_empty(dtype) -> None:
    mask = np.zeros((6, 7, 8), dtype)
    assert foreground_box(mask) is None
    mask[1, 2, 3] = mask[4, 5, 3] = 1
    box = foreground_box(mask)
    assert box == (slice(1, 5), slice(2, 6), slice(3, 4))
    assert all(type(s.start) is int and type(s.stop) is int for s in box)
