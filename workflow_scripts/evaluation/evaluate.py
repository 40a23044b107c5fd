"""Evaluation of one experiment's test-set predictions: the FLARE per-case table and the paper's summary table.

``metrics.tsv`` has the official FLARE column layout (Name, <Class>_DSC ..., <Class>_NSD ...), one row per test
case, so it can be compared with the challenge's own CSVs. ``summary.tsv`` is the layout of the paper's Table 5:
mean ± std over cases per class, then the organ average (the mean over organs of each case, then mean ± std over
cases; the official script's organ score is the same mean). NaN values (only possible with the tubular z-crop quirk
on a one-slice ground truth) are skipped in the means.

Each case is read once (ground truth + prediction) and all classes are scored from that read. A prediction whose
grid differs from the ground truth's is an error naming the case: resampling silently would change the metric.

Test cases without a label (real test sets often hold scans nobody annotated) are predicted but cannot be scored:
``metrics.tsv`` holds the scored cases only, and every row of ``summary.tsv`` says how many cases its means cover
(``Scored_cases``) and which test cases were left out for want of a label (``Unscored_cases``), as does the log.
"""
from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from typing import Mapping, Sequence

import pandas as pd

from .metrics import ClassSpec, case_metrics, class_specs
from ..io.label_map import add_label_map_argument
from ..io.volumes import CaseError, add_tolerance_arguments, read_label, tolerances_from_args, write_text

ORGAN_AVERAGE = "Organ average"


def evaluate_case(case: str, gt_path: str, pred_path: str, classes: Sequence[ClassSpec],
                  nsd_zero_below_dsc: float | None = None,
                  tolerances: Mapping[str, float] | None = None) -> dict[int, tuple[float, float]]:
    """(DSC, NSD) per class of one case; spacing comes from the ground truth's header.

    ``tolerances`` are :meth:`Geometry.mismatch` keyword arguments (the qc config's geometry tolerances).
    """
    gt, gt_geometry = read_label(gt_path, case)
    pred, pred_geometry = read_label(pred_path, case)
    problem = gt_geometry.mismatch(pred_geometry, **(tolerances or {}))
    if problem:
        raise CaseError(case, pred_path, f"prediction geometry differs from the ground truth {gt_path}: {problem}"
                                         " (predictions must be written on the ground truth's grid)")
    return case_metrics(gt, pred, gt_geometry.spacing_zyx, classes, nsd_zero_below_dsc)


def metrics_table(results: Mapping[str, Mapping[int, tuple[float, float]]], labels: Sequence[Mapping]) -> pd.DataFrame:
    """FLARE layout: Name, then every class's DSC, then every class's NSD, in label-map order."""
    rows = []
    for case, per_class in results.items():
        row = {"Name": case}
        row.update({f"{entry['name']}_DSC": per_class[entry["id"]][0] for entry in labels})
        row.update({f"{entry['name']}_NSD": per_class[entry["id"]][1] for entry in labels})
        rows.append(row)
    columns = ["Name"] + [f"{e['name']}_{m}" for m in ("DSC", "NSD") for e in labels]
    return pd.DataFrame(rows, columns=columns)


def _summary_row(target: str, kind: str, dsc: pd.Series, nsd: pd.Series) -> dict:
    """Mean and population std (numpy's convention, defined for a single case too), plus the paper's % text."""
    row = {"Target": target, "Kind": kind}
    for metric, values in (("DSC", dsc), ("NSD", nsd)):
        mean, std = values.mean(), values.std(ddof=0)
        row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
        row[f"{metric}(%)"] = f"{100 * mean:.2f} ± {100 * std:.2f}"
    return row


def summary_table(metrics: pd.DataFrame, labels: Sequence[Mapping], unscored: Sequence[str] = ()) -> pd.DataFrame:
    """Per class mean ± std over cases (organs, then lesions, in label-map order), then the organ average, each row
    with the number of scored cases and the ids of the unscored ones (so a mean is never read as the whole set's)."""
    rows = [_summary_row(e["name"], e["kind"], metrics[f"{e['name']}_DSC"], metrics[f"{e['name']}_NSD"])
            for e in labels]
    organs = [e["name"] for e in labels if e["kind"] == "organ"]
    if organs:
        rows.append(_summary_row(ORGAN_AVERAGE, "average", metrics[[f"{o}_DSC" for o in organs]].mean(axis=1),
                                 metrics[[f"{o}_NSD" for o in organs]].mean(axis=1)))
    table = pd.DataFrame(rows)
    table["Scored_cases"] = len(metrics)
    table["Unscored_cases"] = ",".join(unscored)
    order = {"organ": 0, "lesion": 1, "average": 2}
    return table.sort_values("Kind", key=lambda kind: kind.map(order), kind="stable", ignore_index=True)


def coverage_line(scored: Sequence[str], unscored: Sequence[str]) -> str:
    """The log's account of which test cases the tables cover."""
    line = f"scored {len(scored)} of {len(scored) + len(unscored)} test cases"
    if unscored:
        line += f"; not scored (no label): {len(unscored)}: {', '.join(unscored)}"
    return line


def evaluate_experiment(cases: Sequence[str], gt_paths: Sequence[str], pred_paths: Sequence[str],
                        labels: Sequence[Mapping], z_crop_classes: Sequence[int] = (),
                        nsd_zero_below_dsc: float | None = None, tolerances: Mapping[str, float] | None = None,
                        jobs: int = 1) -> pd.DataFrame:
    """The metrics table of all cases; ``jobs`` > 1 scores cases in parallel processes (one case per process)."""
    if not len(cases) == len(gt_paths) == len(pred_paths):
        raise ValueError(f"{len(cases)} cases but {len(gt_paths)} ground truths and {len(pred_paths)} predictions")
    classes = class_specs(labels, z_crop_classes)
    args = [(case, gt, pred, classes, nsd_zero_below_dsc, tolerances)
            for case, gt, pred in zip(cases, gt_paths, pred_paths)]
    if jobs > 1 and len(args) > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, len(args))) as pool:
            scores = list(pool.map(evaluate_case, *zip(*args)))
    else:
        scores = [evaluate_case(*a) for a in args]
    return metrics_table(dict(zip(cases, scores)), labels)


def write_tsv(path: str, table: pd.DataFrame) -> None:
    """Atomic TSV with six decimals (enough for the 1e-6 agreement with the official script)."""
    write_text(path, table.to_csv(sep="\t", index=False, float_format="%.6f"))


def optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "null", "") else float(text)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FLARE DSC/NSD of one experiment's test-set predictions.")
    parser.add_argument("--cases", nargs="+", required=True, help="the test cases to score (those with a label)")
    parser.add_argument("--unscored", nargs="*", default=[],
                        help="test cases without a label: predicted, not scored; listed in the summary and the log")
    parser.add_argument("--gt", nargs="+", required=True, help="ground-truth label files, in --cases order")
    parser.add_argument("--pred", nargs="+", required=True, help="prediction files, in --cases order")
    add_label_map_argument(parser)  # with each class's nsd_tolerance_mm
    parser.add_argument("--z-crop-classes", type=int, nargs="*", default=[],
                        help="classes scored on the ground truth's z-range only (official quirk); none by default")
    parser.add_argument("--nsd-zero-below-dsc", type=optional_float, default=None,
                        help="official quirk: NSD is 0 where DSC is below this ('none' disables)")
    add_tolerance_arguments(parser)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--metrics", required=True, help="output: per-case FLARE table (TSV)")
    parser.add_argument("--summary", required=True, help="output: mean ± std per class (TSV)")
    args = parser.parse_args(argv)
    both = sorted(set(args.cases) & set(args.unscored))
    if both:
        parser.error(f"cases both scored and unscored: {both}")

    labels = args.label_map
    metrics = evaluate_experiment(args.cases, args.gt, args.pred, labels, args.z_crop_classes,
                                  args.nsd_zero_below_dsc, tolerances_from_args(args), args.jobs)
    summary = summary_table(metrics, labels, args.unscored)
    write_tsv(args.metrics, metrics)
    write_tsv(args.summary, summary)
    print(coverage_line(args.cases, args.unscored))
    print(summary.drop(columns=["Scored_cases", "Unscored_cases"]).to_string(index=False))


if __name__ == "__main__":
    main()
