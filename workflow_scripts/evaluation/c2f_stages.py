"""The coarse-to-fine student's two stages, measured apart on the test set.

A whole-case DSC mixes two failures: the coarse stage's box missing part of the anatomy (the fine stage never sees
it) and the fine stage delineating badly inside a good box. Per test case this table says whether the box holds all
of the ground-truth foreground (and which share of it), and gives the organ-mean DSC inside the box next to the
one of the whole case. The share of cases whose box holds everything is the coarse stage's figure of merit.
"""
from __future__ import annotations

import argparse
import sys
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..c2f.predict import BOX_COLUMNS
from ..io.label_map import add_label_map_argument
from ..io.volumes import CaseError, atomic_path, read_label
from .metrics import dice

COLUMNS = ["case", "box", "box_holds_foreground", "foreground_in_box", "organ_dsc_in_box", "organ_dsc_case",
           "lesion_dsc_in_box", "lesion_dsc_case"]


def mean_dsc(truth: np.ndarray, prediction: np.ndarray, class_ids: Sequence[int]) -> float:
    """Mean DSC over the classes present in the truth or the prediction (NaN when none is)."""
    scores = [dice(truth == class_id, prediction == class_id) for class_id in class_ids]
    present = [score for score in scores if not np.isnan(score)]
    return float(np.mean(present)) if present else float("nan")


def stage_row(case: str, truth: np.ndarray, prediction: np.ndarray, box: tuple[slice, ...] | None,
              organs: Sequence[int], lesions: Sequence[int]) -> dict:
    """The row of one case; ``box`` None means the fine stage ran on the whole volume (it holds everything)."""
    inside = (slice(None),) * 3 if box is None else box
    foreground = truth > 0
    total = int(foreground.sum())
    held = int(foreground[inside].sum())
    return {
        "case": case,
        "box": "whole volume" if box is None else " ".join(f"{s.start}:{s.stop}" for s in box),
        "box_holds_foreground": held == total,
        "foreground_in_box": held / total if total else 1.0,
        "organ_dsc_in_box": mean_dsc(truth[inside], prediction[inside], organs),
        "organ_dsc_case": mean_dsc(truth, prediction, organs),
        "lesion_dsc_in_box": mean_dsc(truth[inside], prediction[inside], lesions),
        "lesion_dsc_case": mean_dsc(truth, prediction, lesions),
    }


def read_boxes(tables: Sequence[str]) -> dict[str, tuple[slice, ...] | None]:
    """Boxes per case from the prediction shards' box tables (an empty row: no box, the whole volume)."""
    boxes: dict[str, tuple[slice, ...] | None] = {}
    for path in tables:
        table = pd.read_csv(path, sep="\t", dtype={"case": str})
        if list(table.columns) != BOX_COLUMNS:
            raise ValueError(f"{path}: columns {list(table.columns)}, expected {BOX_COLUMNS}")
        for row in table.itertuples(index=False):
            values = list(row)[1:]
            boxes[row.case] = (None if any(pd.isna(v) for v in values)
                               else tuple(slice(int(a), int(b)) for a, b in zip(values[::2], values[1::2])))
    return boxes


def stages_table(cases: Sequence[str], truths: Sequence[str], predictions: Sequence[str],
                 boxes: Mapping[str, tuple[slice, ...] | None], labels: Sequence[Mapping]) -> pd.DataFrame:
    organs = [int(e["id"]) for e in labels if e["kind"] == "organ"]
    lesions = [int(e["id"]) for e in labels if e["kind"] == "lesion"]
    rows = []
    for case, truth_path, prediction_path in zip(cases, truths, predictions, strict=True):
        if case not in boxes:
            raise CaseError(case, prediction_path, "no box recorded by the prediction job")
        truth, _ = read_label(truth_path, case)
        prediction, _ = read_label(prediction_path, case)
        if truth.shape != prediction.shape:
            raise CaseError(case, prediction_path, f"shape {prediction.shape} differs from the truth {truth.shape}")
        rows.append(stage_row(case, truth, prediction, boxes[case], organs, lesions))
    return pd.DataFrame(rows, columns=COLUMNS)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", required=True)
    parser.add_argument("--gt", nargs="+", required=True)
    parser.add_argument("--pred", nargs="+", required=True)
    parser.add_argument("--boxes", nargs="+", required=True, help="box tables of the prediction shards")
    add_label_map_argument(parser)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    try:
        table = stages_table(args.cases, args.gt, args.pred, read_boxes(args.boxes), args.label_map)
    except CaseError as err:
        sys.exit(f"error: {err}")
    with atomic_path(args.output) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.4f")
    print(table.to_string(index=False))
    print(f"coarse box holds the whole foreground in {table['box_holds_foreground'].mean():.0%} of the cases")


if __name__ == "__main__":
    main()
