"""How good are the supplemented labels? Pseudo-labels and merged labels scored against a complete truth.

Only possible where the complete truth of the training cases is known (the demo's ``truthTr``, or ``data.truth``
for users who hold back full labels), and worth it there: a weak two-stage student can come from a weak teacher
(bad pseudo-labels) or from a weak student (good labels, poor learning), and only this table tells them apart.

Per case and class, with ``source`` saying where the merged label's voxels of that class come from:
- ``annotated``: the weak label has the class (the merge keeps it; DSC measures the annotation itself);
- ``filled``: the weak label lacks it and the merge filled it from the pseudo-label (DSC of what was filled);
- ``missing``: the weak label lacks it and the merge did not fill it (a class the teacher does not predict, such
  as the lesion; DSC 0 where the truth has it).
``pseudo.tsv`` scores the pseudo-label of every pseudo-labelled case per teacher class; ``merged.tsv`` scores the
merged label of every merged case per class. A class absent from both truth and label gets no row (nothing to
score), as in the FLARE evaluation.
"""
from __future__ import annotations

import argparse
import sys
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..io.label_map import add_label_map_argument
from ..io.volumes import CaseError, atomic_path, read_label
from .metrics import dice

COLUMNS = ["case", "class_id", "name", "kind", "source", "truth_voxels", "label_voxels", "dsc"]


def score_label(case: str, truth: np.ndarray, label: np.ndarray, classes: Sequence[Mapping],
                annotated: Sequence[int] | None) -> list[dict]:
    """One row per class of ``classes`` present in the truth or the label.

    ``annotated`` lists the classes of the case's weak label (None: the label is a pseudo-label, every class of
    it was predicted).
    """
    rows = []
    for entry in classes:
        class_id = int(entry["id"])
        t, p = truth == class_id, label == class_id
        n_truth, n_label = int(t.sum()), int(p.sum())
        if not n_truth and not n_label:
            continue
        if annotated is None:
            source = "pseudo"
        elif class_id in annotated:
            source = "annotated"
        else:
            source = "filled" if n_label else "missing"
        rows.append({"case": case, "class_id": class_id, "name": entry["name"], "kind": entry["kind"],
                     "source": source, "truth_voxels": n_truth, "label_voxels": n_label, "dsc": dice(t, p)})
    return rows


def _read_on_truth_grid(case: str, truth_path: str, path: str) -> tuple[np.ndarray, np.ndarray]:
    truth, truth_geometry = read_label(truth_path, case)
    label, geometry = read_label(path, case)
    mismatch = geometry.mismatch(truth_geometry)
    if mismatch:
        raise CaseError(case, path, f"not on the grid of the truth {truth_path}: {mismatch}")
    return truth, label


def score_cases(cases: Sequence[str], truths: Sequence[str], labels: Sequence[str], classes: Sequence[Mapping],
                annotated: Mapping[str, Sequence[int]] | None) -> pd.DataFrame:
    """The table for every case (``annotated``: the weak label's classes per case, None for pseudo-labels)."""
    rows: list[dict] = []
    for case, truth_path, label_path in zip(cases, truths, labels, strict=True):
        truth, label = _read_on_truth_grid(case, truth_path, label_path)
        rows += score_label(case, truth, label, classes, None if annotated is None else annotated[case])
    return pd.DataFrame(rows, columns=COLUMNS)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean DSC and row count per class and source: the line the benchmark and the report print."""
    if table.empty:
        return pd.DataFrame(columns=["name", "source", "cases", "mean_dsc"])
    grouped = table.groupby(["class_id", "name", "source"], sort=True)["dsc"]
    return grouped.agg(cases="count", mean_dsc="mean").reset_index().drop(columns="class_id")


def annotated_classes(split_table: str) -> dict[str, list[int]]:
    """Classes of each case's weak label, from the split table (column ``classes``, comma-separated ids)."""
    table = pd.read_csv(split_table, sep="\t", dtype=str, keep_default_na=False)
    return {row.case: [int(c) for c in str(row.classes).split(",") if c] for row in table.itertuples()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", default=[])
    parser.add_argument("--truth", nargs="*", default=[], help="complete truth per case")
    parser.add_argument("--labels", nargs="*", default=[], help="pseudo or merged label per case")
    add_label_map_argument(parser)
    parser.add_argument("--classes", type=int, nargs="*", help="score only these ids (default: the whole map)")
    parser.add_argument("--split", help="the split table: scores merged labels by annotated/filled/missing")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    classes = [e for e in args.label_map if args.classes is None or int(e["id"]) in args.classes]
    try:
        table = score_cases(args.cases, args.truth, args.labels, classes,
                            annotated_classes(args.split) if args.split else None)
    except CaseError as err:
        sys.exit(f"error: {err}")
    with atomic_path(args.output) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.4f")
    print(f"{len(args.cases)} cases scored against the truth")
    print(summary(table).to_string(index=False))


if __name__ == "__main__":
    main()
