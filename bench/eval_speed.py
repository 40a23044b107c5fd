"""Benchmark: the workflow's FLARE DSC/NSD against a straightforward full-volume implementation of the same method.

Builds a synthetic FLARE-sized case (default 300 x 512 x 512 voxels, z y x, 13 organs + lesions as ellipsoids) and a
perturbed "prediction", then scores every class twice: with ``workflow_scripts.evaluation.metrics.case_metrics`` (one read,
per-class union-box crops) and with the textbook version (full-volume masks per class, SciPy correlate for the
neighbour codes, full-volume EDTs, DeepMind's own surfel-area table). Prints both times (wall and CPU), the
speed-up ratios (goal >= 10) and the largest absolute difference of any DSC/NSD (goal <= 1e-6).

    .venv/bin/python bench/eval_speed.py                   # FLARE-sized; the full-volume side takes ~10 min on 2 cores
    .venv/bin/python bench/eval_speed.py --shape 80 160 160  # quick check

Needs the test-only reference package ``surface-distance`` (in requirements.lock).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workflow_scripts.evaluation.metrics import CORNER_WEIGHTS, FULL_CODE, ClassSpec, case_metrics  # noqa: E402

FLARE23_TOLERANCES_MM = {1: 5, 2: 3, 3: 3, 4: 5, 5: 2, 6: 2, 7: 2, 8: 2, 9: 2, 10: 3, 11: 5, 12: 7, 13: 3, 14: 2}
# Approximate organ radii as fractions of the volume extent (z, y, x): liver large, adrenals small, and so on.
ORGAN_RADII = {1: (0.25, 0.22, 0.2), 2: (0.12, 0.06, 0.06), 3: (0.12, 0.08, 0.07), 4: (0.06, 0.05, 0.12),
               5: (0.35, 0.025, 0.025), 6: (0.3, 0.03, 0.03), 7: (0.05, 0.02, 0.02), 8: (0.05, 0.02, 0.02),
               9: (0.06, 0.04, 0.04), 10: (0.3, 0.02, 0.02), 11: (0.15, 0.1, 0.12), 12: (0.07, 0.05, 0.1),
               13: (0.12, 0.06, 0.06)}


def paint_ellipsoid(volume: np.ndarray, centre: np.ndarray, radii: np.ndarray, value: int) -> None:
    """Set the voxels of an axis-aligned ellipsoid to ``value``, touching only its bounding box."""
    lo = np.maximum(np.floor(centre - radii).astype(int), 0)
    hi = np.minimum(np.ceil(centre + radii).astype(int) + 1, volume.shape)
    if np.any(hi <= lo):
        return
    grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1
    volume[tuple(slice(a, b) for a, b in zip(lo, hi))][inside] = value


def synthetic_case(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A ground truth with 13 organs and 3 lesions, and a prediction with shifted, rescaled objects.

    The prediction also misses one lesion and adds a false-positive one, so the empty-mask paths run too.
    """
    rng = np.random.default_rng(seed)
    extent = np.array(shape, dtype=float)
    gt = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for cls, fractions in ORGAN_RADII.items():
        radii = np.maximum(np.array(fractions) * extent, 2)
        centre = rng.uniform(radii, extent - radii)
        paint_ellipsoid(gt, centre, radii, cls)
        paint_ellipsoid(pred, centre + rng.integers(-3, 4, 3), radii * rng.uniform(0.85, 1.15, 3), cls)
    for lesion in range(3):
        radii = np.maximum(rng.uniform(0.01, 0.04, 3) * extent, 1.5)
        centre = rng.uniform(radii, extent - radii)
        paint_ellipsoid(gt, centre, radii, 14)
        if lesion < 2:
            paint_ellipsoid(pred, centre + rng.integers(-1, 2, 3), radii * rng.uniform(0.8, 1.2, 3), 14)
    paint_ellipsoid(pred, rng.uniform(10, extent - 10), np.full(3, 3.0), 14)
    return gt, pred


def straightforward_case_metrics(gt: np.ndarray, pred: np.ndarray, spacing: tuple[float, ...],
                                 tolerances: dict[int, float]) -> dict[int, tuple[float, float]]:
    """The method as written in the paper/reference: full-volume masks, codes, EDTs and sums for every class."""
    from surface_distance.lookup_tables import create_table_neighbour_code_to_surface_area

    table = create_table_neighbour_code_to_surface_area(spacing)
    kernel = CORNER_WEIGHTS.astype(np.uint8)
    results = {}
    for cls, tolerance in tolerances.items():
        g, p = gt == cls, pred == cls
        if not g.any() or not p.any():
            results[cls] = (1.0, 1.0) if not g.any() and not p.any() else (0.0, 0.0)
            continue
        dsc = 2 * np.sum(g & p) / (np.sum(g) + np.sum(p))
        # corner grid: pad one background voxel at the end; correlate's 2x2x2 window reaches one voxel back
        codes = [ndimage.correlate(np.pad(m, ((0, 1),) * 3).astype(np.uint8), kernel, mode="constant")
                 for m in (g, p)]
        borders = [(c != 0) & (c != FULL_CODE) for c in codes]
        dist = [ndimage.distance_transform_edt(~b, sampling=spacing) for b in borders]
        areas_g, areas_p = table[codes[0][borders[0]]], table[codes[1][borders[1]]]
        d_gp, d_pg = dist[1][borders[0]], dist[0][borders[1]]
        nsd = (areas_g[d_gp <= tolerance].sum() + areas_p[d_pg <= tolerance].sum()) / (areas_g.sum() + areas_p.sum())
        results[cls] = (float(dsc), float(nsd))
    return results


def timed(function, *args):
    """Result, wall seconds and CPU seconds of this process (the CPU ratio is robust to other load)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], help="voxels z y x")
    parser.add_argument("--spacing", type=float, nargs=3, default=[2.5, 0.8, 0.8], help="mm z y x")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    spacing = tuple(args.spacing)
    gt, pred = synthetic_case(tuple(args.shape), args.seed)
    specs = [ClassSpec(cls, tol) for cls, tol in FLARE23_TOLERANCES_MM.items()]
    print(f"case {tuple(args.shape)} (z y x), spacing {spacing} mm, {len(specs)} classes", flush=True)

    ours, t_ours, cpu_ours = timed(case_metrics, gt, pred, spacing, specs)
    print(f"workflow (union-box crops):  {t_ours:8.2f} s wall, {cpu_ours:8.2f} s CPU", flush=True)
    reference, t_ref, cpu_ref = timed(straightforward_case_metrics, gt, pred, spacing, FLARE23_TOLERANCES_MM)
    print(f"straightforward full-volume: {t_ref:8.2f} s wall, {cpu_ref:8.2f} s CPU", flush=True)

    diff = max(abs(a - b) for cls in reference for a, b in zip(ours[cls], reference[cls]))
    for cls in sorted(reference):
        print(f"  class {cls:2d}: DSC {ours[cls][0]:.6f} NSD {ours[cls][1]:.6f}")
    print(f"speed-up ratio: {t_ref / t_ours:.1f}x wall, {cpu_ref / cpu_ours:.1f}x CPU time (goal >= 10)")
    print(f"max |difference|: {diff:.3g} (goal <= 1e-6)")


if __name__ == "__main__":
    main()
