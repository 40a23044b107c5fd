"""The training manifest: the cases a student trains on, as a table (case, image, label, category).

A file rather than command-line arguments: thousands of paths would exceed the shell's argument limit. The rules
of both students write it with :func:`write_manifest`; the c2f trainer and the nnU-Net student dataset read it.
The ``category`` column is the case's split category (strong / weak / unlabeled): an unlabeled case's label is the
teacher's (merged) pseudo-label, which the c2f trainer does not validate against. It is optional, so a
hand-written table of annotated cases (case, image, label) is a manifest too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import pandas as pd

from .volumes import write_text

MANIFEST_COLUMNS = ("case", "image", "label")  # required; "category" is optional


@dataclass(frozen=True)
class TrainingCase:
    case: str
    image: str
    label: str
    category: str | None = None  # split category; None: not given (an annotated case)

    @property
    def unlabeled(self) -> bool:
        """The label is the teacher's pseudo-label, not an annotation."""
        return self.category == "unlabeled"


def write_manifest(path: str | os.PathLike, cases: Sequence[str], images: Sequence[str],
                   labels: Sequence[str], categories: Sequence[str] | None = None) -> None:
    """Atomically write the manifest; the lists are parallel (``categories`` optional)."""
    lengths = [len(cases), len(images), len(labels)] + ([] if categories is None else [len(categories)])
    if len(set(lengths)) != 1:
        raise ValueError(f"{lengths} cases, images, labels (and categories): lengths differ")
    columns = {"case": list(cases), "image": list(images), "label": list(labels)}
    if categories is not None:
        columns["category"] = list(categories)
    write_text(path, pd.DataFrame(columns).to_csv(sep="\t", index=False))


def read_manifest(path: str | os.PathLike) -> list[TrainingCase]:
    """The manifest's cases, in file order (all columns as text: a case id like ``0001`` stays as written)."""
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = set(MANIFEST_COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"{path}: manifest lacks columns {sorted(missing)}")
    categories = table["category"] if "category" in table.columns else [""] * len(table)
    return [TrainingCase(row.case, row.image, row.label, category or None)
            for row, category in zip(table.itertuples(index=False), categories)]
