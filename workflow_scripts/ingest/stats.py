"""Label statistics (the paper's Fig. 2): what each training label annotates, and how much of it.

Per case: the classes present, their voxel counts and volumes, the number of connected components and the bounding
box of each class. Aggregated: one long table, a per-class summary, the histogram of "number of annotated classes
per case" (which reveals FLARE23's weak labels: most cases annotate one class or a few) and a per-class presence
bar chart.

Label files decompress at about 1 GB/s, so statistics must cost less than reading to keep up (the bench asks
for >= 0.7x of plain reading). Annotated voxels usually fill a small part of a CT volume; everything here therefore
works inside bounding boxes: the whole volume is only touched by cheap max projections that find the foreground.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import cc3d
import numpy as np
import pandas as pd
from scipy import ndimage

from ..io.label_map import LabelClass, add_label_map_argument, label_classes
from ..io.volumes import CaseError, atomic_path, foreground_box, read_label, write_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CASE_COLUMNS = ["case", "class_id", "name", "kind", "voxels", "volume_ml", "components",
                "bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1"]


def class_statistics(
    label: np.ndarray, voxel_volume_mm3: float, classes: Mapping[int, LabelClass], connectivity: int = 26
) -> pd.DataFrame:
    """One row per class present: voxel count, volume (mL), connected components and bounding box.

    Bounding boxes are half-open voxel indices (z, y, x) of the full volume. ``ndimage.find_objects`` gives every
    class's box in one pass over the foreground box; counting and connected components (cc3d on the class mask)
    then only touch that class's own box. Labelling each class separately gives exactly the components of one
    multi-label pass, since components never join different labels.
    """
    rows = []
    box = foreground_box(label)
    if box is not None:
        crop = label[box]
        offset = [s.start for s in box]
        for class_id, class_box in enumerate(ndimage.find_objects(crop), start=1):
            if class_box is None:
                continue
            mask = crop[class_box] == class_id
            voxels = int(np.count_nonzero(mask))
            # uint8 view, not bool: cc3d 4.1.1 miscounts its union-find size for boolean 26-connected inputs that
            # are one voxel thick in two axes (e.g. a 3x1x1 mask [1, 0, 1]) and raises "maximum length exception"
            components = int(cc3d.connected_components(mask.view(np.uint8), connectivity=connectivity,
                                                        return_N=True)[1])
            info = classes.get(class_id, LabelClass(class_id, f"class_{class_id}", "unknown"))
            starts = [int(o + s.start) for o, s in zip(offset, class_box)]
            stops = [int(o + s.stop) for o, s in zip(offset, class_box)]
            rows.append([class_id, info.name, info.kind, voxels, voxels * voxel_volume_mm3 / 1000.0, components,
                         *starts, *stops])
    return pd.DataFrame(rows, columns=CASE_COLUMNS[1:])


def case_statistics(case: str, label_path: str, classes: Mapping[int, LabelClass], connectivity: int = 26
                    ) -> pd.DataFrame:
    """Statistics of one label file, read once; negative values (which QC rejects) are refused here too."""
    label, geometry = read_label(label_path, case)
    if label.size and label.min() < 0:
        raise CaseError(case, label_path, "label map has negative values")
    table = class_statistics(label, geometry.voxel_volume_mm3, classes, connectivity)
    table.insert(0, "case", case)
    return table


def require_qc_ok(case: str, qc_json: str) -> None:
    """Refuse a case whose QC record is not ok: its statistics would feed the split with a broken label."""
    record = json.loads(Path(qc_json).read_text())
    if record.get("status") != "ok":
        raise CaseError(case, qc_json, f"QC rejected this case: {'; '.join(record.get('reasons', []))}")


def aggregate(
    tables: Mapping[str, pd.DataFrame], classes: Mapping[int, LabelClass]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """Combine per-case tables (keyed by case) into the long table, a per-class summary and the class-count histogram.

    The histogram is indexed 0..number of classes so empty bins still show (the layout of the paper's Fig. 2).
    """
    frames = [table for table in tables.values() if not table.empty]
    long = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=CASE_COLUMNS)
    long = long.sort_values(["case", "class_id"], ignore_index=True)
    per_class = long.groupby("class_id").agg(
        cases=("case", "size"), median_volume_ml=("volume_ml", "median"), median_components=("components", "median")
    )
    summary = pd.DataFrame(
        [(info.id, info.name, info.kind) for info in classes.values()], columns=["class_id", "name", "kind"]
    ).join(per_class, on="class_id")
    summary["cases"] = summary["cases"].fillna(0).astype(int)
    summary.insert(4, "fraction", summary["cases"] / max(len(tables), 1))
    classes_per_case = pd.Series({case: len(table) for case, table in tables.items()}, dtype=int)
    histogram = classes_per_case.value_counts().reindex(range(len(classes) + 1), fill_value=0)
    histogram.index.name = "annotated_classes"
    return long, summary, histogram


def plot_class_counts(histogram: pd.Series, path: str) -> None:
    """Bar chart of cases per number of annotated classes (the paper's Fig. 2)."""
    fig, ax = _new_figure((7, 4))
    bars = ax.bar(histogram.index, histogram.values, color="tab:blue")
    ax.bar_label(bars, fontsize=8)
    ax.set_xticks(histogram.index)
    ax.set_xlabel("annotated classes in the label")
    ax.set_ylabel("cases")
    ax.set_title(f"Distribution of label counts ({int(histogram.sum())} labelled cases)")
    _save(fig, path)


def plot_class_presence(summary: pd.DataFrame, n_cases: int, path: str) -> None:
    """Bar chart of how many labelled cases annotate each class (organs blue, lesions red)."""
    fig, ax = _new_figure((8, 4))
    colors = ["tab:red" if kind == "lesion" else "tab:blue" for kind in summary["kind"]]
    bars = ax.bar(summary["name"], summary["cases"], color=colors)
    ax.bar_label(bars, fontsize=8)
    ax.set_ylabel("cases")
    ax.set_ylim(0, max(n_cases, 1) * 1.1)
    ax.set_title(f"Cases annotating each class (of {n_cases} labelled cases)")
    ax.tick_params(axis="x", labelrotation=45)
    _save(fig, path)


def _new_figure(size: tuple[float, float]) -> tuple[Figure, Axes]:
    """A figure with one axes counting cases (integer ticks).

    matplotlib is imported here, not at module level: it doubles the start-up time of the thousands of per-case
    jobs, which never plot. A plain ``Figure`` (not pyplot) needs no GUI backend.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=size)
    ax = fig.subplots()
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _save(fig: Figure, path: str) -> None:
    """Write a figure atomically: Snakemake must never see a half-written PNG."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)


def write_table(path: str | Path, table: pd.DataFrame) -> None:
    """Atomically write a tab-separated table (six significant digits for floats such as volumes)."""
    write_text(path, table.to_csv(sep="\t", index=False, float_format="%.6g"))


def _case_command(args: argparse.Namespace) -> int:
    require_qc_ok(args.case, args.qc)
    table = case_statistics(args.case, args.label, label_classes(args.label_map), args.connectivity)
    write_table(args.output, table)
    print(f"{args.case}: {len(table)} class(es) present: {', '.join(map(str, table['name']))}")
    return 0


def _aggregate_command(args: argparse.Namespace) -> int:
    classes = label_classes(args.label_map)
    # keep_default_na=False: a class may be named like a missing-value marker ("NA")
    tables = {Path(path).name.removesuffix(".tsv"): pd.read_csv(path, sep="\t", keep_default_na=False)
              for path in args.tables}
    long, summary, histogram = aggregate(tables, classes)
    write_table(args.table, long)
    write_table(args.summary, summary)
    plot_class_counts(histogram, args.counts_png)
    plot_class_presence(summary, len(tables), args.presence_png)
    print(f"{len(tables)} labelled case(s); cases per number of annotated classes:")
    print(histogram.to_string())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    case = commands.add_parser("case", help="statistics of one label file")
    case.add_argument("--case", required=True)
    case.add_argument("--label", required=True)
    case.add_argument("--qc", required=True, help="the case's QC record; it must say ok")
    add_label_map_argument(case)
    case.add_argument("--connectivity", type=int, choices=[6, 18, 26], required=True)
    case.add_argument("--output", required=True)
    case.set_defaults(run=_case_command)
    agg = commands.add_parser("aggregate", help="combine per-case tables into tables and figures")
    add_label_map_argument(agg)
    agg.add_argument("--table", required=True)
    agg.add_argument("--summary", required=True)
    agg.add_argument("--counts-png", required=True)
    agg.add_argument("--presence-png", required=True)
    agg.add_argument("tables", nargs="*", help="per-case tables named <case>.tsv (none when no case is labelled)")
    agg.set_defaults(run=_aggregate_command)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CaseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
