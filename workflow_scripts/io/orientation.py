"""Canonical orientation: the one axis order and direction in which a network sees every volume.

The same anatomy stored with identity direction cosines and with flipped x/y cosines (both common in real
collections) gives voxel arrays that are mirror images of each other; with permuted axes, transposed copies. A
network that works in array index space, like the coarse-to-fine student, would take them for different inputs and
learn every organ once per storage convention. So before the network each volume is brought to
:data:`CANONICAL` = LPS, the DICOM orientation in which array index x runs towards the patient's left, y towards
posterior and z towards superior: ITK's identity direction. This is what ``SimpleITK.DICOMOrient(image, "LPS")``
does (the tests check that they agree), done here on the numpy array: axes are only permuted and reversed, never
resampled, so it is cheap, exact and exactly invertible. Predictions are taken back with
:meth:`Reorientation.from_canonical` and written with the input's own geometry, so outputs still match the input
voxel for voxel. A volume that is already LPS (e.g. ITK's reading of most NIfTI scans) is left untouched.

Oblique directions are taken to the nearest axis-aligned orientation, as DICOMOrient does; no voxel is moved
between physical positions, so a tilt stays a tilt.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

CANONICAL = "LPS"  # what SimpleITK calls the orientation of an identity direction

Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Reorientation:
    """How a (z, y, x) array in a file's own order becomes canonical: ``np.transpose`` by ``axes`` (canonical axis
    i is the file's axis ``axes[i]``), then the canonical axes marked in ``flip`` reversed."""

    axes: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @property
    def is_identity(self) -> bool:
        return self.axes == (0, 1, 2) and not any(self.flip)

    def _flipped_axes(self) -> tuple[int, ...]:
        return tuple(axis for axis, flipped in enumerate(self.flip) if flipped)

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """The array in canonical order (C-contiguous; the array itself when nothing changes)."""
        return np.ascontiguousarray(np.flip(np.transpose(array, self.axes), self._flipped_axes()))

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_canonical`: a canonical array back in the file's own order."""
        return np.ascontiguousarray(np.transpose(np.flip(array, self._flipped_axes()), np.argsort(self.axes)))

    def spacing_zyx(self, spacing_zyx: Sequence[float]) -> tuple[float, ...]:
        """Voxel spacing of the canonical array, (z, y, x)."""
        return tuple(float(spacing_zyx[axis]) for axis in self.axes)

    def box_from_canonical(self, box: Box, canonical_shape: Sequence[int]) -> Box:
        """A box (z, y, x slices) of the canonical array as the same voxels' box in the file's own order."""
        unflipped = [slice(n - s.stop, n - s.start) if flipped else s
                     for s, n, flipped in zip(box, canonical_shape, self.flip)]
        file_box: list[slice] = [slice(None)] * 3
        for canonical_axis, file_axis in enumerate(self.axes):
            file_box[file_axis] = unflipped[canonical_axis]
        return tuple(file_box)


def reorientation(direction: Sequence[float]) -> Reorientation:
    """The :class:`Reorientation` of a volume with SimpleITK direction cosines ``direction`` (row-major 3x3:
    column c is index axis c's unit vector in LPS world coordinates).

    Each index axis is matched to the world axis it runs closest to; the assignment maximises the summed alignment
    over the six possible ones, so even a 45 degree tilt gets one definite answer.
    """
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-6:
        raise ValueError(f"direction cosines {tuple(direction)} are not an invertible 3D direction")
    # world axis of each index axis (x, y, z), best overall match first
    world_of = max(itertools.permutations(range(3)),
                   key=lambda perm: sum(abs(matrix[perm[c], c]) for c in range(3)))
    axes = [0, 0, 0]
    flip = [False, False, False]
    for index_axis, world_axis in enumerate(world_of):
        # numpy axis k holds index axis 2 - k; canonical index axis = world axis
        axes[2 - world_axis] = 2 - index_axis
        flip[2 - world_axis] = bool(matrix[world_axis, index_axis] < 0)
    return Reorientation(tuple(axes), tuple(flip))
