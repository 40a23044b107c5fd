"""Which cases the embedded demo dataset contains, decided from the config alone.

Snakemake must know every case id before the demo volumes exist, so the plan (names and annotation kind of each
case) is a cheap pure function of the ``demo`` config; :mod:`workflow_scripts.demo.dataset` draws the volumes
for exactly this plan.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..io.layout import demo_layout

KINDS = ("strong", "lesion_only", "partial", "unlabeled")


@dataclass(frozen=True)
class DemoPlan:
    train: dict[str, str]  # case id -> annotation kind (one of KINDS)
    test: list[str]

    @property
    def labelled(self) -> list[str]:
        return [case for case, kind in self.train.items() if kind != "unlabeled"]


def kind_counts(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Split ``n`` cases by ``fractions`` with the largest-remainder method, so the counts always add up to n."""
    total = sum(fractions.get(kind, 0.0) for kind in KINDS)
    if total <= 0 or abs(total - 1.0) > 1e-6:
        raise ValueError(f"demo.completeness fractions must sum to 1, they sum to {total:g}")
    exact = {kind: n * fractions.get(kind, 0.0) for kind in KINDS}
    counts = {kind: int(np.floor(value)) for kind, value in exact.items()}
    by_remainder = sorted(KINDS, key=lambda kind: exact[kind] - counts[kind], reverse=True)
    for kind in by_remainder[: n - sum(counts.values())]:
        counts[kind] += 1
    return counts


def plan(demo: dict) -> DemoPlan:
    """Case ids and annotation kinds, deterministic from ``demo['seed']``."""
    counts = kind_counts(demo["n_train"], demo["completeness"])
    kinds = np.array([kind for kind in KINDS for _ in range(counts[kind])])
    np.random.default_rng(demo["seed"]).shuffle(kinds)
    train = {f"FLARE23_{i + 1:04d}": str(kind) for i, kind in enumerate(kinds)}
    test = [f"FLARE23Ts_{i + 1:04d}" for i in range(demo["n_test"])]
    return DemoPlan(train, test)


def _demo_root(results: str) -> str:
    return os.path.dirname(demo_layout(results)["images"])


def truth_path(results: str, case: str) -> str:
    """Complete ground truth of a training case (every class, whatever its annotation kind): lets later stages
    score pseudo-labels and merged labels against what a full annotation would have said."""
    return os.path.join(_demo_root(results), "truthTr", f"{case}.nii.gz")


def dataset_json_path(results: str) -> str:
    return os.path.join(_demo_root(results), "dataset.json")
