"""Reading and writing volumes: the one place that handles geometry and atomic writes.

Every stage reads images and labels through :func:`read_volume` and writes through :func:`write_volume`, so that
outputs always carry the input image's exact origin, spacing and direction, and so that a crash never leaves a
half-written file where Snakemake expects a finished one.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

# Unanchored: it is matched whole (fullmatch; "$" would let a trailing newline through) and is also the Snakemake
# wildcard constraint of case ids (rules/common.smk).
CASE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class CaseError(Exception):
    """A problem with one case's input; the message always names the case and the file."""

    def __init__(self, case: str, path: str | os.PathLike | None, reason: str) -> None:
        self.case = case
        self.path = None if path is None else str(path)
        self.reason = reason
        where = f" (file {self.path})" if self.path else ""
        super().__init__(f"case {case!r}{where}: {reason}")

    def __reduce__(self):
        """Rebuild from the three fields, so the error survives process pools (pickling)."""
        return (type(self), (self.case, self.path, self.reason))


def validate_case_id(case: str, path: str | os.PathLike | None = None) -> str:
    """Reject ids that would break paths or wildcards (separators, whitespace, leading dots)."""
    if not CASE_ID_PATTERN.fullmatch(case):
        raise CaseError(
            case, path, "invalid case id: use letters, digits, '.', '_' or '-' only (no spaces or path separators)"
        )
    return case


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a volume, in SimpleITK's (x, y, z) convention."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    @property
    def spacing_zyx(self) -> tuple[float, ...]:
        """Spacing in numpy (z, y, x) order, matching arrays from :func:`read_volume`."""
        return tuple(reversed(self.spacing))

    @property
    def shape_zyx(self) -> tuple[int, ...]:
        return tuple(reversed(self.size))

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def apply(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def mismatch(self, other: "Geometry", spacing_rtol: float = 1e-3, origin_atol: float = 1e-2,
                 direction_atol: float = 1e-4) -> str | None:
        """Describe the first difference to ``other`` beyond the tolerances, or None when they match."""
        if self.size != other.size:
            return f"size {self.size} != {other.size}"
        if not np.allclose(self.spacing, other.spacing, rtol=spacing_rtol, atol=0):
            return f"spacing {self.spacing} != {other.spacing}"
        if not np.allclose(self.origin, other.origin, rtol=0, atol=origin_atol):
            return f"origin {self.origin} != {other.origin}"
        if not np.allclose(self.direction, other.direction, rtol=0, atol=direction_atol):
            return f"direction {self.direction} != {other.direction}"
        return None


# Geometry.mismatch keyword -> command-line flag (config keys qc.spacing_tolerance, qc.origin_tolerance_mm,
# qc.direction_tolerance); a flag left out keeps Geometry.mismatch's default, equal to the config schema's.
TOLERANCE_FLAGS = {"spacing_rtol": "--spacing-tolerance", "origin_atol": "--origin-tolerance-mm",
                   "direction_atol": "--direction-tolerance"}


def add_tolerance_arguments(parser: argparse.ArgumentParser) -> None:
    """The geometry tolerance flags of every CLI that compares two volumes' grids."""
    parser.add_argument("--spacing-tolerance", type=float, help="qc.spacing_tolerance (relative)")
    parser.add_argument("--origin-tolerance-mm", type=float, help="qc.origin_tolerance_mm")
    parser.add_argument("--direction-tolerance", type=float, help="qc.direction_tolerance (absolute)")


def tolerances_from_args(args: argparse.Namespace) -> dict[str, float]:
    """:meth:`Geometry.mismatch` keywords from the flags given."""
    values = {key: getattr(args, flag.removeprefix("--").replace("-", "_")) for key, flag in TOLERANCE_FLAGS.items()}
    return {key: value for key, value in values.items() if value is not None}


def foreground_box(label: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Bounding box (z, y, x slices) of all non-zero voxels of a 3D array, or None when there are none.

    Max projections are SIMD reductions, about 25x cheaper than a per-voxel bookkeeping pass: the z profile
    first, then the y/x projection of the occupied slab only. Stages that work on the foreground of a volume
    (label statistics, component cleanup, the coarse-to-fine crops) crop to it first.
    """
    occupied_z = np.flatnonzero(label.max(axis=(1, 2)))
    if occupied_z.size == 0:
        return None
    z0, z1 = int(occupied_z[0]), int(occupied_z[-1]) + 1
    plane = label[z0:z1].max(axis=0)
    ys, xs = np.flatnonzero(plane.max(axis=1)), np.flatnonzero(plane.max(axis=0))
    return slice(z0, z1), slice(int(ys[0]), int(ys[-1]) + 1), slice(int(xs[0]), int(xs[-1]) + 1)


def read_image(path: str | os.PathLike, case: str) -> sitk.Image:
    """Read any SimpleITK-readable file; a failure becomes a :class:`CaseError` naming case and file."""
    path = Path(path)
    if not path.is_file():
        raise CaseError(case, path, "file does not exist")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[-1] if str(err).strip() else "unreadable"
        raise CaseError(case, path, f"cannot be read: {first_line}") from err


def read_volume(path: str | os.PathLike, case: str) -> tuple[np.ndarray, Geometry]:
    """Return the voxel array in (z, y, x) order and its geometry; only 3D single-channel volumes are accepted."""
    image = read_image(path, case)
    if image.GetDimension() != 3:
        raise CaseError(case, path, f"expected a 3D volume, found {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(case, path, f"expected one channel, found {image.GetNumberOfComponentsPerPixel()}")
    return sitk.GetArrayFromImage(image), Geometry.of(image)


def read_label(path: str | os.PathLike, case: str) -> tuple[np.ndarray, Geometry]:
    """Read a label map; it must hold integers (floats with fractional parts are rejected)."""
    array, geometry = read_volume(path, case)
    if not np.issubdtype(array.dtype, np.integer):
        raise CaseError(case, path, f"label map must have an integer voxel type, found {array.dtype}")
    return array, geometry


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` and move it into place only if the block succeeds.

    The temporary name keeps the final suffixes so writers that pick a format by extension still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_volume(path: str | os.PathLike, array: np.ndarray, geometry: Geometry, compress: bool = True) -> None:
    """Atomically write ``array`` (z, y, x) with exactly ``geometry``'s placement."""
    if tuple(array.shape) != geometry.shape_zyx:
        raise ValueError(f"array shape {array.shape} does not match geometry {geometry.shape_zyx} for {path}")
    image = geometry.apply(sitk.GetImageFromArray(np.ascontiguousarray(array)))
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
