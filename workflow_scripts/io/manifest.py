"""The training manifest: the cases a student trains on, as a table (case, image, label).

A file rather than command-line arguments: thousands of paths would exceed the shell's argument limit. The rules
of both students write it with :func:`write_manifest`; the c2f trainer and the nnU-Net student dataset read it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import pandas as pd

from .volumes import write_text

MANIFEST_COLUMNS = ("case", "image", "label")


@dataclass(frozen=True)
class TrainingCase:
    case: str
    image: str
    label: str


def write_manifest(path: str | os.PathLike, cases: Sequence[str], images: Sequence[str],
                   labels: Sequence[str]) -> None:
    """Atomically write the manifest; the three lists are parallel."""
    if not len(cases) == len(images) == len(labels):
        raise ValueError(f"{len(cases)} cases, {len(images)} images and {len(labels)} labels: lengths differ")
    table = pd.DataFrame({"case": list(cases), "image": list(images), "label": list(labels)})
    write_text(path, table.to_csv(sep="\t", index=False))


def read_manifest(path: str | os.PathLike) -> list[TrainingCase]:
    """The manifest's cases, in file order (all columns as text: a case id like ``0001`` stays as written)."""
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = set(MANIFEST_COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"{path}: manifest lacks columns {sorted(missing)}")
    return [TrainingCase(row.case, row.image, row.label) for row in table.itertuples(index=False)]
