"""Label merging: supplement each weak label with the teacher's pseudo-label, never touching an annotation.

The rule is the paper's (two-stage weak-label training, FLARE23), applied per foreground class: if the class occurs
anywhere in the weak label, its annotation is trusted as complete and every pseudo voxel of that class is discarded
(even outside the annotated region, otherwise the student would learn two disagreeing outlines of one organ);
otherwise the weak label's *background* voxels that the teacher predicts as that class take the class. Annotated
voxels never change, so a pseudo organ can never overwrite a lesion.

Optionally pseudo voxels below ``min_confidence`` are not trusted either: they stay background, or become the
nnU-Net ignore label (highest label id + 1) so that the student's loss skips them instead of learning background.

Strong cases pass through unchanged, unlabeled cases (an all-background "weak label") take the pseudo-label. Every
voxel of an unlabeled case is the teacher's, so its confidence filter may be set apart from the weak cases'
(``merge.unlabeled_min_confidence`` and ``merge.unlabeled_low_confidence_as``, see :func:`category_settings`).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..ingest.split import CATEGORIES
from ..io.label_map import add_label_map_argument, ignore_label
from ..io.volumes import (CaseError, Geometry, add_tolerance_arguments, read_label, tolerances_from_args, write_text,
                          write_volume)

LOW_CONFIDENCE_AS = ("background", "ignore")
PSEUDO_CATEGORIES = ("weak", "unlabeled")  # split categories whose merged labels hold pseudo voxels
# columns of the per-case table written by case_table (the summary checks its inputs against them)
TABLE_COLUMNS = ("class_id", "name", "annotated", "pseudo_voxels", "filled_voxels", "filled_ml",
                 "low_confidence_voxels", "ignored_voxels")


def merged_dtype(ignore: int) -> type[np.unsignedinteger]:
    """Smallest unsigned type holding every label id and the ignore label (uint8 unless ids reach 255)."""
    return np.uint8 if ignore <= np.iinfo(np.uint8).max else np.uint16


class LabelValuesError(ValueError):
    """An input holds values it may not hold; ``which`` names the input ("weak", "pseudo" or "confidence")."""

    def __init__(self, which: str, message: str) -> None:
        self.which = which
        super().__init__(message)


def value_counts(values: np.ndarray, n_values: int, chunk: int = 1 << 20) -> np.ndarray:
    """Voxels per value (index = value, at least ``n_values`` entries) of a non-negative integer array.

    np.bincount converts its input to int64 first; counting in chunks keeps that copy at 8 MiB (cache-sized, so
    also faster) instead of eight times the volume (1.2 GB for a 512x512x300 uint8 label).
    """
    flat = values.reshape(-1)
    counts = np.zeros(n_values, dtype=np.int64)
    for start in range(0, flat.size, chunk):
        part = np.bincount(flat[start : start + chunk], minlength=n_values)
        if part.size > counts.size:  # a value beyond n_values: grow, as np.bincount would
            part[: counts.size] += counts
            counts = part
        else:
            counts[: part.size] += part
    return counts


def class_counts(label: np.ndarray, allowed: Iterable[int], which: str, n_values: int) -> np.ndarray:
    """Voxels per value (``n_values`` entries) from one counting pass; values outside ``{0} | allowed`` are an error.

    One pass gives both the validation and the "classes present" lookup, so the merge never scans a class mask
    per class.
    """
    allowed_set = {0, *(int(v) for v in allowed)}
    if np.issubdtype(label.dtype, np.signedinteger) and label.size and int(label.min()) < 0:
        raise LabelValuesError(which, f"{which} label holds negative values")
    counts = value_counts(label, n_values)
    bad = sorted(set(np.flatnonzero(counts).tolist()) - allowed_set)
    if bad:
        raise LabelValuesError(which, f"{which} label holds values {bad} outside the allowed ids {sorted(allowed_set)}")
    return counts


@dataclass(frozen=True)
class MergeSettings:
    """Everything the merge needs besides the arrays; built from the config by :func:`settings_from_config`."""

    label_ids: tuple[int, ...]  # every id of the label map (organs and lesions)
    fill_classes: tuple[int, ...]  # classes the teacher predicts: the only ones that can be filled
    min_confidence: float  # pseudo voxels with confidence / 255 below this are not filled
    low_confidence_as: str  # what those voxels become: "background" or "ignore"
    ignore: int  # the ignore label id, see :func:`workflow_scripts.io.label_map.ignore_label`
    # classes the pseudo-label may hold (None: fill_classes). A later round's pseudo-labeller, a student, predicts
    # every class of the label map; those outside fill_classes (the lesion, by default) are then dropped, not an error
    pseudo_classes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.low_confidence_as not in LOW_CONFIDENCE_AS:
            raise ValueError(f"low_confidence_as must be one of {LOW_CONFIDENCE_AS}, got {self.low_confidence_as!r}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must lie in [0, 1], got {self.min_confidence}")
        unknown = sorted(set(self.fill_classes) - set(self.label_ids))
        if unknown:
            raise ValueError(f"fill classes {unknown} are not in the label map {sorted(self.label_ids)}")
        unknown = sorted(set(self.pseudo_classes or ()) - set(self.label_ids))
        if unknown:
            raise ValueError(f"pseudo classes {unknown} are not in the label map {sorted(self.label_ids)}")
        if self.ignore <= max(self.label_ids):
            raise ValueError(f"ignore label {self.ignore} collides with the label ids (max {max(self.label_ids)})")


def category_settings(merge: Mapping, category: str) -> tuple[float, str]:
    """``(min_confidence, low_confidence_as)`` of a case of split ``category`` from the ``merge`` config section.

    Unlabeled cases take ``unlabeled_min_confidence`` / ``unlabeled_low_confidence_as`` where set (null: the weak
    cases' values). Separate keys let the filter of the unlabeled cases, where no annotation anchors any voxel, be
    stricter without re-merging the weak cases and retraining the students that never see an unlabeled case; the
    values of strong and weak cases stay exactly ``min_confidence`` and ``low_confidence_as``.
    """
    if category == "unlabeled":
        threshold, low_as = merge["unlabeled_min_confidence"], merge["unlabeled_low_confidence_as"]
        return (merge["min_confidence"] if threshold is None else threshold,
                merge["low_confidence_as"] if low_as is None else low_as)
    return merge["min_confidence"], merge["low_confidence_as"]


def settings_from_config(labels: Sequence[Mapping], fill_classes: Sequence[int], min_confidence: float,
                         low_confidence_as: str, pseudo_classes: Sequence[int] | None = None) -> MergeSettings:
    return MergeSettings(
        label_ids=tuple(int(entry["id"]) for entry in labels),
        fill_classes=tuple(int(c) for c in fill_classes),
        min_confidence=float(min_confidence),
        low_confidence_as=low_confidence_as,
        ignore=ignore_label(labels),
        pseudo_classes=None if pseudo_classes is None else tuple(int(c) for c in pseudo_classes),
    )


@dataclass(frozen=True)
class MergeResult:
    merged: np.ndarray
    annotated: np.ndarray  # bool per value id: the class occurs in the weak label (its pseudo voxels discarded)
    pseudo_voxels: np.ndarray  # voxels per value id predicted by the teacher
    filled: np.ndarray  # voxels per value id that changed from background to the class
    low_confidence: np.ndarray  # voxels per value id that would be filled but are below min_confidence
    ignored: np.ndarray  # voxels per value id (the pseudo class) set to the ignore label


def merge_labels(weak: np.ndarray, pseudo: np.ndarray, confidence: np.ndarray | None,
                 settings: MergeSettings) -> MergeResult:
    """Supplement ``weak`` with ``pseudo`` by the paper's per-class rule, vectorised over all classes at once.

    ``confidence`` holds the teacher's confidence as uint8 (value / 255); it may be None only when
    ``min_confidence`` is 0. Memory stays a few copies of one case: the per-class decision is a lookup table
    indexed by the pseudo value instead of one mask per class.
    """
    if weak.shape != pseudo.shape or (confidence is not None and confidence.shape != weak.shape):
        shapes = [weak.shape, pseudo.shape] + ([] if confidence is None else [confidence.shape])
        raise ValueError(f"weak label, pseudo-label and confidence shapes differ: {shapes}")
    if confidence is not None and confidence.dtype != np.uint8:
        raise LabelValuesError("confidence", f"confidence must be uint8 (value / 255), found {confidence.dtype}")
    if not np.issubdtype(pseudo.dtype, np.unsignedinteger):
        # copying its voxels into the unsigned merged label would fail with numpy's bare casting TypeError
        raise LabelValuesError("pseudo", "pseudo-label must have an unsigned integer voxel type (the teacher writes"
                                         f" uint8), found {pseudo.dtype}")
    if settings.min_confidence > 0 and confidence is None:
        raise ValueError("min_confidence > 0 needs the confidence map")
    n_values = max(settings.label_ids) + 1
    annotated = class_counts(weak, settings.label_ids, "weak", n_values) > 0
    annotated[0] = False
    pseudo_counts = class_counts(pseudo, settings.pseudo_classes or settings.fill_classes, "pseudo", n_values)

    # fillable[v]: pseudo value v is a teacher class that the weak label does not annotate anywhere
    fillable = np.zeros(n_values, dtype=bool)
    fillable[list(settings.fill_classes)] = True
    fillable &= ~annotated
    candidates = fillable[pseudo]
    candidates &= weak == 0

    merged = weak.astype(merged_dtype(settings.ignore), copy=True)
    np.copyto(merged, pseudo, where=candidates)
    # a fillable class has no voxel in the weak label, so its merged voxels are exactly its candidates
    proposed = np.where(fillable, value_counts(merged, n_values)[:n_values], 0)
    filled = proposed
    if settings.min_confidence > 0:
        # value / 255 < min_confidence holds exactly for the values below this count (the test is monotone), so
        # one integer comparison replaces a float copy of the volume
        below = int(np.count_nonzero(np.arange(256) / 255.0 < settings.min_confidence))
        low = confidence < below
        low &= candidates
        np.putmask(merged, low, settings.ignore if settings.low_confidence_as == "ignore" else 0)
        filled = np.where(fillable, value_counts(merged, n_values)[:n_values], 0)
    low_confidence = proposed - filled
    ignored = low_confidence if settings.low_confidence_as == "ignore" else np.zeros_like(low_confidence)
    return MergeResult(merged, annotated, pseudo_counts, filled, low_confidence, ignored)


def pass_through(label: np.ndarray, settings: MergeSettings) -> MergeResult:
    """A strong case: the merged label is the raw label, voxel for voxel (only the voxel type is unified)."""
    n_values = max(settings.label_ids) + 1
    annotated = class_counts(label, settings.label_ids, "weak", n_values) > 0
    annotated[0] = False
    zeros = np.zeros(n_values, dtype=np.int64)
    return MergeResult(label.astype(merged_dtype(settings.ignore), copy=False), annotated, zeros, zeros, zeros,
                       zeros)


def case_table(result: MergeResult, labels: Sequence[Mapping], voxel_volume_mm3: float) -> pd.DataFrame:
    """Per-class report of one merged case: whether the class was annotated, what the teacher predicted, what was
    filled (voxels and ml), what was not filled for low confidence and how much of that became the ignore label."""
    ids = [int(entry["id"]) for entry in labels]
    return pd.DataFrame({
        "class_id": ids,
        "name": [entry["name"] for entry in labels],
        "annotated": result.annotated[ids],
        "pseudo_voxels": result.pseudo_voxels[ids],
        "filled_voxels": result.filled[ids],
        "filled_ml": np.round(result.filled[ids] * voxel_volume_mm3 / 1000.0, 4),
        "low_confidence_voxels": result.low_confidence[ids],
        "ignored_voxels": result.ignored[ids],
    })


def _check_geometry(case: str, reference: Geometry, reference_path: str, other: Geometry, other_path: str,
                    tolerances: Mapping[str, float]) -> None:
    problem = reference.mismatch(other, **tolerances)
    if problem:
        raise CaseError(case, other_path, f"geometry differs from {reference_path}: {problem}")


def merge_case(case: str, weak_path: str | None, pseudo_path: str | None, confidence_path: str | None,
               settings: MergeSettings, labels: Sequence[Mapping], out_label: str, out_table: str,
               tolerances: Mapping[str, float] | None = None) -> MergeResult:
    """Read one case's inputs, merge (or pass through when there is no pseudo-label) and write both outputs.

    Everything is read and checked before anything is written, so a bad input leaves no output behind. Without a
    weak label (an unlabeled case) the weak label is all background on the pseudo-label's grid. The output keeps
    the weak label's geometry exactly (the pseudo-label's for an unlabeled case).
    """
    if weak_path is None and pseudo_path is None:
        raise CaseError(case, None, "neither a weak label nor a pseudo-label given")
    if pseudo_path is not None and confidence_path is None:
        raise CaseError(case, pseudo_path, "pseudo-label given without its confidence map")
    tolerances = dict(tolerances or {})  # Geometry.mismatch keywords; absent ones keep its defaults
    paths = {"weak": weak_path, "pseudo": pseudo_path, "confidence": confidence_path}
    weak = pseudo = confidence = None
    if weak_path is not None:
        weak, geometry = read_label(weak_path, case)
    if pseudo_path is not None:
        pseudo, pseudo_geometry = read_label(pseudo_path, case)
        confidence, confidence_geometry = read_label(confidence_path, case)
        _check_geometry(case, pseudo_geometry, pseudo_path, confidence_geometry, confidence_path, tolerances)
        if weak is None:
            geometry = pseudo_geometry
            weak = np.zeros(pseudo.shape, dtype=np.uint8)
        else:
            _check_geometry(case, geometry, weak_path, pseudo_geometry, pseudo_path, tolerances)
    try:
        result = (pass_through(weak, settings) if pseudo is None
                  else merge_labels(weak, pseudo, confidence, settings))
    except LabelValuesError as err:
        raise CaseError(case, paths[err.which], str(err)) from err
    write_volume(out_label, result.merged, geometry)
    write_text(out_table, case_table(result, labels, geometry.voxel_volume_mm3).to_csv(sep="\t", index=False))
    return result


def summary_table(tables: Mapping[str, str], categories: Mapping[str, str]) -> pd.DataFrame:
    """One row per merged case: category, voxels filled per class, totals filled / low-confidence / ignored, and
    the classes the weak label annotated."""
    rows = []
    for case, path in tables.items():
        table = pd.read_csv(path, sep="\t")
        missing = sorted(set(TABLE_COLUMNS) - set(table.columns))
        if missing:
            raise CaseError(case, path, f"not a merge table: columns {missing} missing")
        if case not in categories:
            raise CaseError(case, path, "case is not in the split table")
        row = {"case": case, "category": categories[case]}
        row.update({f"filled_{name}": int(v) for name, v in zip(table["name"], table["filled_voxels"])})
        row["filled_total"] = int(table["filled_voxels"].sum())
        row["filled_ml_total"] = round(float(table["filled_ml"].sum()), 4)
        row["low_confidence_voxels"] = int(table["low_confidence_voxels"].sum())
        row["ignored_voxels"] = int(table["ignored_voxels"].sum())
        row["annotated_classes"] = ",".join(str(c) for c in table.loc[table["annotated"], "class_id"])
        rows.append(row)
    return pd.DataFrame(rows)


def student_table(summary: pd.DataFrame, categories: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """One row per student experiment on merged labels: the merged cases it trains on per category (``strong``,
    ``weak``, ``unlabeled``) and, for the pseudo-labelled categories, the voxels filled, left out for low confidence
    and set to the ignore label in those cases (``<category>_filled_voxels`` ...).

    ``summary`` is the merge summary (one row per merged case, with its category); ``categories`` maps each
    experiment to the categories it trains on. Counts come from the summary, i.e. from the merged labels that exist,
    not from the config.
    """
    sizes = summary["category"].value_counts()
    rows = []
    for experiment, used in categories.items():
        row: dict = {"experiment": experiment}
        for category in CATEGORIES:
            row[category] = int(sizes.get(category, 0)) if category in used else 0
        for category in PSEUDO_CATEGORIES:
            cases = summary[summary["category"] == category] if category in used else summary.iloc[:0]
            row[f"{category}_filled_voxels"] = int(cases["filled_total"].sum())
            row[f"{category}_low_confidence_voxels"] = int(cases["low_confidence_voxels"].sum())
            row[f"{category}_ignored_voxels"] = int(cases["ignored_voxels"].sum())
        rows.append(row)
    columns = ["experiment", *CATEGORIES] + [f"{c}_{n}_voxels" for c in PSEUDO_CATEGORIES
                                              for n in ("filled", "low_confidence", "ignored")]
    return pd.DataFrame(rows, columns=columns)


def rule_inputs(case: str, strong_cases: Collection[str], merged_cases: Collection[str], raw_label: str | None,
                pseudo_dir: str) -> dict[str, str]:
    """Named inputs of the merge rule for one case: a strong case needs only its raw label; any other case that
    gets a merged label needs its pseudo-label and confidence map, plus its raw label when it has one."""
    if case in strong_cases:
        return {"weak": raw_label}
    if case not in merged_cases:
        raise ValueError(f"case {case!r} gets no merged label (unlabeled, and pseudo.include_unlabeled is false)")
    inputs = {"pseudo": str(Path(pseudo_dir) / f"{case}.nii.gz"),
              "confidence": str(Path(pseudo_dir) / f"{case}_confidence.nii.gz")}
    if raw_label is not None:
        inputs["weak"] = raw_label
    return inputs


def input_flags(named_paths: Iterable[tuple[str, str]]) -> str:
    """Command-line flags (``--weak PATH`` ...) for whichever inputs a case has, shell-quoted."""
    return " ".join(f"--{name} {shlex.quote(str(path))}" for name, path in named_paths)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts.labels.merge", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    case = sub.add_parser("case", help="merge one case (or pass a strong case through)")
    case.add_argument("--case", required=True)
    case.add_argument("--weak", help="the raw label; omitted for an unlabeled case")
    case.add_argument("--pseudo", help="the teacher's pseudo-label; omitted for a strong case")
    case.add_argument("--confidence", help="the pseudo-label's confidence map (uint8, value / 255)")
    add_label_map_argument(case)
    case.add_argument("--fill-classes", type=int, nargs="+", required=True, help="teacher.classes")
    case.add_argument("--pseudo-classes", type=int, nargs="+",
                      help="classes the pseudo-label may hold (default: --fill-classes); the others are not filled")
    case.add_argument("--min-confidence", type=float, default=0.0)
    case.add_argument("--low-confidence-as", choices=LOW_CONFIDENCE_AS, default="background")
    add_tolerance_arguments(case)
    case.add_argument("--output-label", required=True)
    case.add_argument("--output-table", required=True)
    summary = sub.add_parser("summary", help="collect per-case merge tables into one")
    summary.add_argument("--split", required=True, help="split/split.tsv (case, category)")
    summary.add_argument("--tables", nargs="+", required=True, help="merged/{case}.tsv files")
    summary.add_argument("--output", required=True)
    students = sub.add_parser("students", help="per student experiment: merged cases and pseudo voxels it trains on")
    students.add_argument("--summary", required=True, help="merged/summary.tsv")
    students.add_argument("--categories", required=True, type=json.loads,
                          help="JSON: experiment -> split categories it trains on (experiments on merged labels)")
    students.add_argument("--output", required=True)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.command == "summary":
        categories = dict(pd.read_csv(args.split, sep="\t")[["case", "category"]].itertuples(index=False))
        tables = {Path(p).name.removesuffix(".tsv"): p for p in args.tables}
        write_text(args.output, summary_table(tables, categories).to_csv(sep="\t", index=False))
        print(f"summary of {len(tables)} merged cases -> {args.output}")
        return 0
    if args.command == "students":
        table = student_table(pd.read_csv(args.summary, sep="\t", dtype={"case": str}), args.categories)
        for row in table.itertuples(index=False):
            print(f"{row.experiment}: {row.strong} strong, {row.weak} weak, {row.unlabeled} unlabeled merged cases "
                  f"({row.unlabeled_ignored_voxels} ignored voxels in the unlabeled ones)")
        write_text(args.output, table.to_csv(sep="\t", index=False))
        return 0
    labels = args.label_map
    settings = settings_from_config(labels, args.fill_classes, args.min_confidence, args.low_confidence_as,
                                    args.pseudo_classes)
    result = merge_case(args.case, args.weak, args.pseudo, args.confidence, settings, labels, args.output_label,
                        args.output_table, tolerances_from_args(args))
    filled = {int(c): int(n) for c, n in enumerate(result.filled) if n}
    print(f"case {args.case}: annotated {np.flatnonzero(result.annotated).tolist()}, filled {filled}, "
          f"ignored {int(result.ignored.sum())} voxels -> {args.output_label}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CaseError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
