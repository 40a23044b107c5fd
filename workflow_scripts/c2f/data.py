"""Data handling of the coarse-to-fine student: the model input step, bounding boxes, crop/uncrop, label mapping,
training-sample preparation and the fine-stage augmentation pipeline.

The coarse-to-fine design never resamples to a target spacing: the coarse stage sees the whole volume resized to a
fixed grid, the fine stage sees the foreground box resized to another fixed grid. That keeps inference cost
independent of the scan's size, and it is why everything here works in voxel index space (z, y, x) with the
spacing only used to turn millimetre margins into voxels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from ..io.volumes import foreground_box

Box = tuple[slice, slice, slice]
IGNORE_INDEX = 255  # class index of voxels the loss must skip (uint8, outside any real class index)


# --- model input step -------------------------------------------------------------------------------------------

def window_normalise(volume: torch.Tensor, window: Sequence[float]) -> torch.Tensor:
    """Clip to the CT window and scale it to [0, 1].

    A fixed HU window (not per-case z-scoring) keeps the intensity meaning of tissue identical across scans, and
    [0, 1] is the range the augmentation strengths of the paper (noise std 0.01, ...) are expressed in.
    """
    low, high = float(window[0]), float(window[1])
    return volume.clamp(low, high).sub_(low).div_(high - low)  # in place on clamp's copy: one full-size buffer


def resize_image(volume: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear resize of a (Z, Y, X) intensity volume to ``size``."""
    return F.interpolate(volume[None, None], size=tuple(size), mode="trilinear", align_corners=False)[0, 0]


def resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (Z, Y, X) label volume: labels must never be blended into other ids.

    On CUDA the values travel as float16 (exact for ids up to 2048) to halve the memory of full-size label maps.
    """
    carrier = torch.float16 if labels.is_cuda else torch.float32
    resized = F.interpolate(labels[None, None].to(carrier), size=tuple(size), mode="nearest-exact")[0, 0]
    return resized.to(labels.dtype)


def model_input(volume: torch.Tensor, window: Sequence[float], size: Sequence[int]) -> torch.Tensor:
    """The input step shared by training and inference: window, normalise, resize; returns (1, 1, *size).

    Windowing happens before resizing so out-of-window intensities (bone, air) cannot leak into soft tissue through
    interpolation.
    """
    dtype = volume.dtype if volume.is_floating_point() else torch.float32
    return resize_image(window_normalise(volume.to(dtype), window), size)[None, None]


# --- boxes, margins, crop / uncrop -------------------------------------------------------------------------------

def margin_voxels(margin_mm: float | Sequence[float], spacing_zyx: Sequence[float]) -> tuple[int, ...]:
    """Millimetres to voxels per axis, rounded up so the physical margin is never smaller than asked.

    With anisotropic spacing (e.g. 0.8 x 0.8 x 5 mm) the same 20 mm is 25 voxels in-plane but 4 slices along z.
    """
    margins = np.broadcast_to(np.asarray(margin_mm, dtype=float), (len(spacing_zyx),))
    return tuple(int(math.ceil(m / s - 1e-9)) for m, s in zip(margins, spacing_zyx))


def expand_box(box: Box, before: Sequence[int], after: Sequence[int], shape: Sequence[int]) -> Box:
    """Grow ``box`` by per-axis voxel counts on each side, clipped to the volume."""
    return tuple(
        slice(max(0, s.start - b), min(n, s.stop + a)) for s, b, a, n in zip(box, before, after, shape)
    )


def scale_box(box: Box, from_shape: Sequence[int], to_shape: Sequence[int]) -> Box:
    """Map a box on a resized grid back to the original grid, rounding outwards so no foreground is cut."""
    scaled = []
    for s, n_from, n_to in zip(box, from_shape, to_shape):
        factor = n_to / n_from
        scaled.append(slice(max(0, math.floor(s.start * factor)), min(n_to, math.ceil(s.stop * factor))))
    return tuple(scaled)


def whole_box(shape: Sequence[int]) -> Box:
    return tuple(slice(0, int(n)) for n in shape)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in box)


def uncrop(cropped: torch.Tensor, box: Box, shape: Sequence[int], fill: int = 0) -> torch.Tensor:
    """Place a cropped volume back into a ``shape`` volume filled with ``fill``: the inverse of ``volume[box]``."""
    if box_shape(box) != tuple(cropped.shape):
        raise ValueError(f"crop of shape {tuple(cropped.shape)} does not fit box {box}")
    full = cropped.new_full(tuple(shape), fill)
    full[box] = cropped
    return full


# --- labels ------------------------------------------------------------------------------------------------------

def label_lookup(class_ids: Sequence[int], ignore_label: int | None) -> dict[int, int]:
    """Label id -> class index (0 = background); the ignore label maps to :data:`IGNORE_INDEX`.

    Indices are contiguous even when ids are not, so the network has exactly one output per class.
    """
    lookup = {int(label_id): index for index, label_id in enumerate(class_ids)}
    if ignore_label is not None:
        lookup[int(ignore_label)] = IGNORE_INDEX
    return lookup


def to_class_indices(label: np.ndarray, lookup: dict[int, int]) -> np.ndarray:
    """Map label ids to class indices; raises ValueError naming the ids that the label map does not know."""
    values = np.unique(label)
    unknown = sorted(int(v) for v in values if int(v) not in lookup)
    if unknown:
        raise ValueError(f"label values {unknown} are not in the label map (known: {sorted(lookup)})")
    table = np.zeros(int(values.max()) + 1, dtype=np.uint8)
    for value in values:
        table[int(value)] = lookup[int(value)]
    return table[label]


# --- training samples --------------------------------------------------------------------------------------------

@dataclass
class PreparedCase:
    """What training needs from one case, computed once and cached on disk.

    ``coarse_*`` are the whole volume at the coarse size; ``region_*`` the original-resolution crop around the
    labelled foreground plus the largest training margin, from which every random fine crop is cut. Images are
    stored windowed and normalised (float16), labels as class indices (uint8).
    """

    coarse_image: np.ndarray
    coarse_label: np.ndarray
    region_image: np.ndarray
    region_label: np.ndarray
    foreground: np.ndarray  # (3, 2) start/stop of the labelled foreground inside the region
    spacing_zyx: np.ndarray

    def save(self, path) -> None:
        np.savez(path, **self.__dict__)

    @classmethod
    def load(cls, path) -> "PreparedCase":
        with np.load(path) as data:
            return cls(**{key: data[key] for key in data.files})


def prepare_case(image: np.ndarray, label: np.ndarray, spacing_zyx: Sequence[float], window: Sequence[float],
                 coarse_size: Sequence[int], max_margin_mm: float) -> PreparedCase:
    """Build a :class:`PreparedCase` from a volume and its class-index label map (same shape).

    A label without foreground (possible for a weak label) uses the whole volume as its box, like inference does
    when the coarse stage finds nothing.
    """
    volume = window_normalise(torch.from_numpy(np.asarray(image, dtype=np.float32)), window)
    labels = torch.from_numpy(label)
    box = foreground_box((label != 0) & (label != IGNORE_INDEX)) or whole_box(label.shape)
    margin = margin_voxels(max_margin_mm, spacing_zyx)
    region = expand_box(box, margin, margin, label.shape)
    foreground = np.array([[s.start - r.start, s.stop - r.start] for s, r in zip(box, region)], dtype=np.int64)
    return PreparedCase(
        coarse_image=resize_image(volume, coarse_size).numpy().astype(np.float16),
        coarse_label=resize_labels(labels, coarse_size).numpy(),
        region_image=volume[region].numpy().astype(np.float16),
        region_label=label[region],
        foreground=foreground,
        spacing_zyx=np.asarray(spacing_zyx, dtype=np.float64),
    )


def fine_crop_box(case: PreparedCase, margin_mm_before: Sequence[float], margin_mm_after: Sequence[float]) -> Box:
    """The fine-stage box inside the case's region: labelled foreground plus per-side margins in mm."""
    box = tuple(slice(int(a), int(b)) for a, b in case.foreground)
    before = margin_voxels(margin_mm_before, case.spacing_zyx)
    after = margin_voxels(margin_mm_after, case.spacing_zyx)
    return expand_box(box, before, after, case.region_label.shape)


def fine_sample(case: PreparedCase, box: Box, fine_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop ``box`` from the region and resize it to the fine grid: (1, *fine_size) image and label tensors."""
    image = torch.from_numpy(case.region_image[box].astype(np.float32))
    label = torch.from_numpy(np.ascontiguousarray(case.region_label[box]))
    return resize_image(image, fine_size)[None], resize_labels(label, fine_size)[None]


def random_fine_sample(case: PreparedCase, fine_size: Sequence[int], max_margin_mm: float,
                       rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A training crop: the ground-truth box with an independent random margin in [0, max] mm on every side.

    Random margins teach the fine network to cope with the loose or tight boxes the coarse stage produces.
    """
    before, after = rng.uniform(0, max_margin_mm, size=(2, 3))
    return fine_sample(case, fine_crop_box(case, before, after), fine_size)


def augmentation_pipeline(fine_size: Sequence[int], mirror_axes: Sequence[int] = (0, 1, 2)) -> ComposeTransforms:
    """Table 1 of the paper (MONAI names) expressed with batchgeneratorsv2 transforms, on [0, 1] images.

    - RandFlipd x/y/z p=0.5 each: MirrorTransform flips each of ``mirror_axes`` with probability 0.5. Mirroring a
      left/right-labelled anatomy asks the network to find "right kidney" from context alone (the liver's side) in
      eight orientations; on short schedules that costs most of the learning (README, "Learning"), so the axes
      are a setting (``student.c2f.mirror_axes``; none mirrored = no MirrorTransform).
    - RandZoomd 0.9-1.2, p=0.15: SpatialTransform scaling; batchgenerators scales the sampling grid, so a zoom
      factor z is a scaling of 1/z (same factor on all axes, as RandZoomd does by default).
    - RandGaussianNoised std=0.01, p=0.15: GaussianNoiseTransform takes a variance range, here (0, 0.01^2).
    - RandGaussianSmoothd sigma 0.5-1.15, p=0.15: GaussianBlurTransform, sigma drawn per axis.
    - RandScaleIntensityd factors=0.3, p=0.15: v * (1 + f), f in [-0.3, 0.3] = MultiplicativeBrightnessTransform.
    - RandAdjustContrastd p=0.15: MONAI's contrast adjustment is a gamma curve with gamma in (0.5, 4.5) on the
      min-max rescaled image, which is what GammaTransform does.
    """
    mirroring = [MirrorTransform(allowed_axes=tuple(int(a) for a in mirror_axes))] if len(mirror_axes) else []
    return ComposeTransforms([
        *mirroring,
        SpatialTransform(
            patch_size=tuple(fine_size), patch_center_dist_from_border=0, random_crop=False, p_scaling=0.15,
            scaling=(1 / 1.2, 1 / 0.9), p_synchronize_scaling_across_axes=1, mode_seg="nearest",
        ),
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.01 ** 2)), apply_probability=0.15),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.15)), apply_probability=0.15),
        RandomTransform(
            MultiplicativeBrightnessTransform(multiplier_range=(0.7, 1.3), synchronize_channels=True),
            apply_probability=0.15,
        ),
        RandomTransform(
            GammaTransform(gamma=(0.5, 4.5), p_invert_image=0, synchronize_channels=True, p_per_channel=1,
                           p_retain_stats=0),
            apply_probability=0.15,
        ),
    ])


def augment(pipeline: ComposeTransforms, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``pipeline`` to one (1, Z, Y, X) image/label pair; labels stay integer class indices."""
    out = pipeline(image=image, segmentation=label.to(torch.int16))
    return out["image"], out["segmentation"].to(torch.uint8)
