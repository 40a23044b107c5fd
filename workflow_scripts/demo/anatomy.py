"""Synthetic abdominal anatomy for the demo dataset: FLARE23 organs as smooth shapes, drawn into each case's grid.

Organs are described once, in millimetres of a reference patient (the *template*: scan half-height 110 mm, body
half-depth 115 mm, half-width 165 mm; axes in numpy order z superior, y posterior, x patient-left, as in an LPS
image with identity direction). A case maps its voxel grid into the template with its own affine (field of view,
patient size and position) plus a smooth random displacement, so every case shows the same anatomy at another
size, pose and deformation, as real scans do. Because positions are relative to the body and the scan, every organ
lies inside every volume, which later stages rely on ("all 13 organs annotated" for strong cases).

Shapes are ellipsoids (organs, body, cylinders with an infinite axis) and tubes along smooth centrelines (vessels,
oesophagus, pancreas, duodenum), evaluated only inside their bounding boxes; the cost is a few full-grid passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
from scipy import ndimage
from scipy.interpolate import make_interp_spline
from scipy.spatial.transform import Rotation

# Template half-extents (z, y, x) in mm: the scan's half-height, the body's half-depth and half-width.
TEMPLATE_HALF = np.array([110.0, 115.0, 165.0])
# Smallest semi-axis / tube radius in voxels, so that even adrenals survive coarse demo grids and deformation.
MIN_RADIUS_VOXELS = 1.5
# An organ must keep at least this many voxels (after later organs and lesions are drawn over it).
MIN_ORGAN_VOXELS = 4

# Codes of the background tissue map (organs and lesions live in the label map).
AIR, FAT, MUSCLE, CORTEX, MARROW, DISC, CSF, LUNG, BOWEL, GAS = range(10)

# Organs that can host lesions, with how often each is chosen (liver lesions are the most common in FLARE23).
LESION_HOSTS = {"Liver": 0.45, "RK": 0.12, "LK": 0.12, "Pancreas": 0.16, "Spleen": 0.15}


class Shape(Protocol):
    def level(self, q: Sequence[np.ndarray]) -> np.ndarray:
        """A value <= 1 inside the shape, growing outwards, at template points ``q`` = (z, y, x) arrays."""

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest template coordinate (z, y, x) of the shape."""


@dataclass(frozen=True)
class Ellipsoid:
    """Ellipsoid with principal directions as rows of ``axes``; an infinite semi-axis makes an elliptic cylinder."""

    center: np.ndarray
    semi: np.ndarray
    axes: np.ndarray

    def level(self, q: Sequence[np.ndarray]) -> np.ndarray:
        d = [q[i] - np.float32(self.center[i]) for i in range(3)]
        total = np.zeros(np.broadcast_shapes(*(x.shape for x in d)), dtype=np.float32)
        for k in range(3):
            if np.isinf(self.semi[k]):
                continue
            u = sum(np.float32(self.axes[k, i] / self.semi[k]) * d[i] for i in range(3) if self.axes[k, i] != 0)
            total += u * u
        return np.sqrt(total)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(invalid="ignore"):  # 0 * inf: an infinite axis does not reach along that direction
            reach = np.where(self.axes != 0, np.abs(self.axes) * self.semi[:, None], 0.0)
        half = np.sqrt((reach**2).sum(axis=0))
        return self.center - half, self.center + half


@dataclass(frozen=True)
class Tube:
    """Tube of varying radius around a densely sampled centreline, with rounded ends."""

    points: np.ndarray  # (n, 3) template mm
    radii: np.ndarray  # (n,)

    @classmethod
    def through(cls, knots: Sequence[Sequence[float]], radii: Sequence[float], per_knot: int = 6) -> "Tube":
        """A smooth (cubic spline, chord-length parameter) centreline through ``knots``."""
        knots = np.asarray(knots, dtype=float)
        chord = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(knots, axis=0), axis=1))]
        s = chord / chord[-1]
        spline = make_interp_spline(s, knots, k=min(3, len(knots) - 1))
        dense = np.linspace(0.0, 1.0, per_knot * (len(knots) - 1) + 1)
        return cls(spline(dense), np.interp(dense, s, np.asarray(radii, dtype=float)))

    def level(self, q: Sequence[np.ndarray]) -> np.ndarray:
        best = np.full(np.broadcast_shapes(*(x.shape for x in q)), np.inf, dtype=np.float32)
        for a, b, ra, rb in zip(self.points[:-1], self.points[1:], self.radii[:-1], self.radii[1:]):
            ab = b - a
            d = [q[i] - np.float32(a[i]) for i in range(3)]
            s = np.clip(sum(np.float32(ab[i] / (ab @ ab)) * d[i] for i in range(3)), 0.0, 1.0)
            dist2 = sum((d[i] - s * np.float32(ab[i])) ** 2 for i in range(3))
            np.minimum(best, np.sqrt(dist2) / (np.float32(ra) + s * np.float32(rb - ra)), out=best)
        return best

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = self.radii.max()
        return self.points.min(axis=0) - r, self.points.max(axis=0) + r


def rotation(deg_about_z: float = 0.0, deg_about_y: float = 0.0, deg_about_x: float = 0.0) -> np.ndarray:
    """Rows = rotated unit axes (z, y, x); angles turn within the plane of the two other axes."""
    return Rotation.from_rotvec(np.deg2rad([deg_about_z, deg_about_y, deg_about_x])).as_matrix()


def _ellipsoid(center, semi, rot=(0.0, 0.0, 0.0)) -> Ellipsoid:
    return Ellipsoid(np.asarray(center, float), np.asarray(semi, float), rotation(*rot))


def _cylinder(center_yx, semi_yx) -> Ellipsoid:
    return _ellipsoid((0.0, *center_yx), (np.inf, *semi_yx))


# The 13 FLARE23 organs in drawing order (later ones are drawn over earlier ones where they touch, so small organs
# come last). Template mm, (z, y, x): z superior, y posterior, x patient-left. Liver, spleen and stomach sit high,
# kidneys lower and posterior, vessels in front of the spine, the duodenum loops around the pancreatic head.
ORGAN_TEMPLATE: dict[str, list[Shape]] = {
    "Stomach": [_ellipsoid((55, -30, 60), (48, 35, 40), (0, 20, 0))],
    "Spleen": [_ellipsoid((55, 25, 80), (45, 40, 25), (30, 0, 0))],
    "Liver": [_ellipsoid((50, -5, -65), (55, 70, 65), (-10, 0, 0)), _ellipsoid((60, -45, 0), (35, 30, 45))],
    "RK": [_ellipsoid((-10, 45, -68), (52, 24, 28), (0, -12, 0))],
    "LK": [_ellipsoid((0, 45, 68), (52, 24, 28), (0, 12, 0))],
    "Pancreas": [Tube.through([(-2, 0, -22), (8, 5, 0), (15, 12, 35), (28, 25, 70)], [14, 10, 10, 8])],
    "Duodenum": [
        Tube.through(
            [(30, -28, 22), (32, -25, -10), (22, -12, -38), (0, 0, -42), (-25, -2, -35), (-38, -5, -10),
             (-35, -5, 15), (-20, -8, 25)],
            [10] * 8,
        )
    ],
    "Gallbladder": [_ellipsoid((10, -55, -50), (26, 15, 14), (0, 0, 30))],
    "IVC": [Tube.through([(-130, 15, -22), (-40, 16, -24), (40, 20, -26), (100, 10, -20)], [11, 11, 12, 12])],
    "Aorta": [Tube.through([(-130, 15, 12), (-40, 18, 14), (40, 20, 15), (130, 25, 12)], [10, 11, 12, 13])],
    "Esophagus": [Tube.through([(135, 0, 2), (100, -5, 10), (80, -12, 25), (64, -18, 40)], [8, 8, 8, 9])],
    "RAG": [_ellipsoid((45, 35, -35), (16, 5, 10), (25, 0, 0))],
    "LAG": [_ellipsoid((35, 38, 32), (16, 5, 9), (-25, 0, 0))],
}

# Background structures (tissue code, shape), drawn before organs: lung bases, back muscles, psoas, spine.
TISSUE_TEMPLATE: list[tuple[int, Shape]] = [
    (LUNG, _ellipsoid((150, 35, -85), (65, 60, 70))),
    (LUNG, _ellipsoid((150, 35, 85), (65, 60, 70))),
    (MUSCLE, _cylinder((82, -35), (20, 28))),
    (MUSCLE, _cylinder((82, 35), (20, 28))),
    (MUSCLE, Tube.through([(0, 45, -40), (-60, 48, -48), (-130, 50, -55)], [6, 15, 22])),
    (MUSCLE, Tube.through([(0, 45, 40), (-60, 48, 48), (-130, 50, 55)], [6, 15, 22])),
    (CORTEX, _cylinder((75, 0), (12, 16))),  # vertebral arch
    (CSF, _cylinder((72, 0), (8, 9))),  # spinal canal
    (CORTEX, _cylinder((95, 0), (12, 5))),  # spinous process
]
VERTEBRA = _cylinder((48, 0), (16, 20))  # vertebral body: marrow with a cortical shell and discs
BODY = _cylinder((0, 0), (TEMPLATE_HALF[1], TEMPLATE_HALF[2]))


@dataclass(frozen=True)
class Frame:
    """A case's voxel grid and its map into the template: t = (origin + index * spacing - center) * scale."""

    shape: tuple[int, int, int]  # voxels (z, y, x)
    spacing: np.ndarray  # mm (z, y, x)
    origin: np.ndarray  # mm (z, y, x) of voxel 0
    center: np.ndarray  # physical point (z, y, x) that maps to the template origin
    scale: np.ndarray  # template mm per physical mm (z, y, x)

    def axes(self) -> list[np.ndarray]:
        """Template coordinate of every grid line, per axis (increasing)."""
        return [
            ((self.origin[a] + np.arange(n) * self.spacing[a] - self.center[a]) * self.scale[a]).astype(np.float32)
            for a, n in enumerate(self.shape)
        ]

    @property
    def template_voxel(self) -> np.ndarray:
        """Voxel size in template mm, per axis."""
        return self.spacing * self.scale


def sample_frame(rng: np.random.Generator, shape: Sequence[int], shape_jitter: float,
                 extent_z: Sequence[float], extent_xy: Sequence[float]) -> Frame:
    """Draw a grid around ``shape`` and an abdomen-sized field of view in the configured ranges.

    Spacing is derived (extent / voxels) rather than drawn, so the field of view stays abdomen-like whatever the
    configured voxel counts are: a coarse demo grid gets coarse voxels, a 512-voxel grid gets FLARE-like 0.7-0.9 mm.
    In-plane spacing is isotropic as in real CT (the x extent is the drawn one); slices are usually thicker.
    """
    n = np.maximum(np.rint(np.asarray(shape) * (1 + rng.uniform(-shape_jitter, shape_jitter, 3))), 16).astype(int)
    inplane = rng.uniform(*extent_xy) / n[2]
    spacing = np.array([rng.uniform(*extent_z) / n[0], inplane, inplane])
    extent = spacing * n
    # scanner coordinates: the table position sets z, the field of view is roughly centred in-plane
    origin = np.array([rng.uniform(-650, -150), *(-extent[1:] / 2 + rng.uniform(-30, 30, 2))])
    offset = np.array([rng.uniform(-0.05, 0.05) * extent[0], *rng.uniform(-0.05, 0.05, 2) * extent[1:]])
    center = origin + (n - 1) / 2 * spacing + offset
    half_width = (extent[2] / 2 - abs(offset[2])) * rng.uniform(0.78, 0.92)
    half_depth = min(half_width * rng.uniform(0.62, 0.78), (extent[1] / 2 - abs(offset[1])) * 0.92)
    scale = TEMPLATE_HALF / np.array([extent[0] / 2, half_depth, half_width])
    return Frame(tuple(int(v) for v in n), spacing, origin, center, scale)


@dataclass(frozen=True)
class SmoothField:
    """A sum of a few plane waves, amplitude * sum_k w_k sin(k_k . t + phi_k) with sum_k w_k = 1.

    Smooth by construction, free of full-grid filtering, and bounded by ``amplitude``, which keeps bounding boxes
    of deformed shapes exact. Used for deformations, bias fields and irregular lesion boundaries.
    """

    waves: np.ndarray  # (K, 3) wave vectors, rad/mm
    phases: np.ndarray  # (K,)
    weights: np.ndarray  # (K,), summing to the amplitude

    @classmethod
    def sample(cls, rng: np.random.Generator, amplitude: float, wavelength: Sequence[float],
               count: int = 3) -> "SmoothField":
        directions = rng.normal(size=(count, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        waves = directions * (2 * np.pi / rng.uniform(*wavelength, size=count))[:, None]
        weights = rng.uniform(0.5, 1.0, count)
        return cls(waves, rng.uniform(0, 2 * np.pi, count), amplitude * weights / weights.sum())

    @property
    def amplitude(self) -> float:
        return float(self.weights.sum())

    def __call__(self, axes: Sequence[np.ndarray]) -> np.ndarray:
        """Values on the grid spanned by the 1D coordinate ``axes`` (z, y, x)."""
        z, y, x = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
        out = np.zeros((len(axes[0]), len(axes[1]), len(axes[2])), dtype=np.float32)
        for (kz, ky, kx), phase, weight in zip(self.waves, self.phases, self.weights):
            arg = (np.float32(kz) * z + np.float32(ky) * y + np.float32(phase)) + np.float32(kx) * x
            out += np.float32(weight) * np.sin(arg)
        return out


def _jitter(shape: Shape, rng: np.random.Generator, min_radius: float) -> Shape:
    """A case-specific copy: moved a few mm, resized by ~ +-12 %, turned a few degrees; never thinner than
    ``min_radius`` so the shape keeps voxels on coarse grids."""
    factor = rng.uniform(0.88, 1.12)
    if isinstance(shape, Ellipsoid):
        semi = np.maximum(shape.semi * factor * rng.uniform(0.95, 1.05, 3), min_radius)
        turn = Rotation.from_rotvec(np.deg2rad(rng.normal(0, 4, 3))).as_matrix()
        return Ellipsoid(shape.center + np.clip(rng.normal(0, 4, 3), -8, 8), semi, shape.axes @ turn.T)
    points = shape.points + np.clip(rng.normal(0, 3, 3), -6, 6)
    return Tube(points, np.maximum(shape.radii * factor, min_radius))


@dataclass
class Anatomy:
    """The drawn case: organ label map (configured ids), background tissue map, and what was drawn where."""

    frame: Frame
    label: np.ndarray  # uint8 (z, y, x)
    tissue: np.ndarray  # uint8 tissue codes
    lesions: list["Lesion"]


@dataclass(frozen=True)
class Lesion:
    host: str
    box: tuple[slice, slice, slice]
    mask: np.ndarray  # bool, inside ``box``


class _Canvas:
    """Grid, deformed template coordinates and the box arithmetic shared by every drawn shape."""

    def __init__(self, frame: Frame, deformation: Sequence[SmoothField]) -> None:
        self.axes = frame.axes()
        grid = np.meshgrid(*self.axes, indexing="ij", sparse=True)
        self.q = [grid[a] + deformation[a](self.axes) for a in range(3)]
        self.margin = max(field.amplitude for field in deformation)

    def box(self, shape: Shape) -> tuple[slice, slice, slice]:
        lo, hi = shape.bounds()
        return tuple(
            slice(int(np.searchsorted(ax, lo[a] - self.margin)), int(np.searchsorted(ax, hi[a] + self.margin, "right")))
            for a, ax in enumerate(self.axes)
        )

    def inside(self, shape: Shape) -> tuple[tuple[slice, slice, slice], np.ndarray]:
        box = self.box(shape)
        if any(s.start >= s.stop for s in box):
            return box, np.zeros([0, 0, 0], dtype=bool)
        return box, shape.level([c[box] for c in self.q]) <= 1

    def draw(self, target: np.ndarray, value: int, shape: Shape, allowed: np.ndarray | None = None) -> None:
        box, mask = self.inside(shape)
        if mask.size:
            if allowed is not None:
                mask &= allowed[box]
            target[box][mask] = value


def _draw_background(canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Air, body wall (subcutaneous fat, muscle, ribs), visceral fat, lungs, spine, back muscles and bowel loops."""
    qz, qy, qx = canvas.q
    body = BODY.level(canvas.q)
    fat_frac, muscle_frac = rng.uniform(0.04, 0.12), rng.uniform(0.05, 0.08)
    wall = 1 - fat_frac
    interior = body <= wall - muscle_frac
    tissue = np.where(body <= 1, FAT, AIR).astype(np.uint8)
    tissue[(body <= wall) & ~interior] = MUSCLE
    pitch, phase = rng.uniform(26, 34), rng.uniform(0, 1)
    ribs = (
        (body > wall - muscle_frac - 0.02) & (body <= wall - 0.015) & (qz > -20) & (qy > -0.45 * TEMPLATE_HALF[1])
        & (np.mod((qz + 0.4 * qy) / pitch + phase, 1.0) < 0.35)
    )
    tissue[ribs] = CORTEX
    for code, shape in TISSUE_TEMPLATE:
        canvas.draw(tissue, code, shape, allowed=interior if code == LUNG else None)
    box, vertebra = canvas.inside(VERTEBRA)
    shell = VERTEBRA.level([c[box] for c in canvas.q]) > 0.75
    disc = np.mod(canvas.q[0][box] / rng.uniform(30, 36) + rng.uniform(0, 1), 1.0) < 0.2
    tissue[box][vertebra] = np.select([shell, disc], [CORTEX, DISC], MARROW)[vertebra]
    for _ in range(rng.integers(4, 8)):  # bowel loops in the lower abdomen, some with gas
        center = np.array([rng.uniform(-100, -10), rng.uniform(-70, 15), rng.uniform(-90, 90)])
        semi = rng.uniform(12, 28, 3)
        canvas.draw(tissue, BOWEL, Ellipsoid(center, semi, rotation(*rng.uniform(-40, 40, 3))), allowed=interior)
        if rng.random() < 0.5:
            gas = Ellipsoid(center + np.array([0, -0.4 * semi[1], 0]), semi * 0.45, np.eye(3))
            canvas.draw(tissue, GAS, gas, allowed=interior)
    return tissue


def _place_lesions(rng: np.random.Generator, label: np.ndarray, spacing: np.ndarray, organ_ids: dict[str, int],
                   lesion_id: int, count: int, radius_mm: Sequence[float]) -> list[Lesion]:
    """Draw ``count`` irregular lesions inside host organs (relabelled ``lesion_id``).

    A lesion centre is a voxel deep inside its host; the boundary is a sphere perturbed by a smooth field with a
    wavelength of about its radius, clipped to the host. A try that would take over half of the host's remaining
    voxels (tiny organs on coarse grids) is redrawn, so lesions never erase an organ.
    """
    hosts = list(LESION_HOSTS)
    weights = np.array(list(LESION_HOSTS.values()))
    lesions: list[Lesion] = []
    for _ in range(count * 10):
        if len(lesions) == count:
            break
        host = hosts[rng.choice(len(hosts), p=weights / weights.sum())]
        found = ndimage.find_objects((label == organ_ids[host]).astype(np.uint8))
        if not found:
            continue
        box = found[0]
        inside = label[box] == organ_ids[host]
        depth = ndimage.distance_transform_edt(np.pad(inside, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
        candidates = np.flatnonzero(depth >= 0.6 * depth.max())
        center = np.array(np.unravel_index(candidates[rng.integers(len(candidates))], inside.shape))
        radius = max(rng.uniform(*radius_mm), MIN_RADIUS_VOXELS * spacing.max())
        offsets = [(np.arange(n) - center[a]) * spacing[a] for a, n in enumerate(inside.shape)]
        rough = SmoothField.sample(rng, 0.3, (0.7 * radius, 1.5 * radius), count=4)
        zz, yy, xx = np.meshgrid(*offsets, indexing="ij", sparse=True)
        level = np.sqrt(zz**2 + yy**2 + xx**2) / radius * (1 + rough(offsets))
        blob = (level <= 1) & inside
        if blob.any() and blob.sum() <= 0.5 * inside.sum():
            label[box][blob] = lesion_id
            lesions.append(Lesion(host, box, blob))
    return lesions


def draw_anatomy(rng: np.random.Generator, frame: Frame, organ_ids: dict[str, int], lesion_id: int,
                 n_lesions: int, radius_mm: Sequence[float], deformation_mm: float) -> Anatomy:
    """Draw one case: background tissues, the 13 organs (case-jittered, deformed) and ``n_lesions`` lesions.

    Raises RuntimeError when an organ ends up with fewer than :data:`MIN_ORGAN_VOXELS` voxels or fewer lesions
    than asked could be placed; callers name the case.
    """
    deformation = [SmoothField.sample(rng, deformation_mm, (120, 260)) for _ in range(3)]
    canvas = _Canvas(frame, deformation)
    tissue = _draw_background(canvas, rng)
    label = np.zeros(frame.shape, dtype=np.uint8)
    min_radius = MIN_RADIUS_VOXELS * frame.template_voxel.max()
    for name, shapes in ORGAN_TEMPLATE.items():
        for shape in shapes:
            canvas.draw(label, organ_ids[name], _jitter(shape, rng, min_radius))
    lesions = _place_lesions(rng, label, frame.spacing, organ_ids, lesion_id, n_lesions, radius_mm)
    counts = np.bincount(label.ravel(), minlength=256)
    small = [name for name, i in organ_ids.items() if counts[i] < MIN_ORGAN_VOXELS]
    if small:
        raise RuntimeError(f"organs {small} have fewer than {MIN_ORGAN_VOXELS} voxels on grid {frame.shape}")
    if len(lesions) < n_lesions:
        raise RuntimeError(f"placed only {len(lesions)} of {n_lesions} lesions")
    return Anatomy(frame, label, tissue, lesions)
