"""Report figures (matplotlib, PNG): per-class DSC box plots, efficiency versus image size, qualitative overlays.

- Box plots show the spread over test cases, which the means of the ablation table hide (weak-label failures are
  often all-or-nothing per case).
- Efficiency plots time and peak memory against the number of voxels, the paper's Table 6 as a picture; the memory
  axis says whether it is GPU memory or CPU resident memory (CPU-only runs).
- Overlays follow the paper's Fig. 4: image | ground truth | each compared experiment, for the best and the worst
  test case by the ranking experiment's organ-mean DSC, on the axial slice with the most lesion voxels in the
  ground truth (the most foreground when the case has no lesion).
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator, StrMethodFormatter  # noqa: E402

from ..io.label_map import add_label_map_argument  # noqa: E402
from ..io.volumes import CaseError, atomic_path, read_label, read_volume  # noqa: E402


def save(figure: plt.Figure, path: str, dpi: int) -> None:
    """Write the PNG atomically and free the figure."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(figure)


def dsc_boxplots(metrics: Mapping[str, pd.DataFrame], labels: Sequence[Mapping]) -> plt.Figure:
    """One group of boxes per class, one box per experiment, of the per-case DSC."""
    names = [entry["name"] for entry in labels]
    experiments = list(metrics)
    width = 0.8 / len(experiments)
    figure, axis = plt.subplots(figsize=(min(16.0, 2 + 0.3 * len(names) * len(experiments)), 4.5))
    colours = plt.get_cmap("tab10").colors
    for k, (experiment, table) in enumerate(metrics.items()):
        data = [table[f"{name}_DSC"].dropna().to_numpy() for name in names]
        positions = np.arange(len(names)) + (k - (len(experiments) - 1) / 2) * width
        boxes = axis.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True,
                             flierprops={"markersize": 3})
        for box in boxes["boxes"]:
            box.set_facecolor(colours[k % len(colours)])
    axis.set_xticks(np.arange(len(names)), names, rotation=45, ha="right")
    axis.set_ylabel("DSC per test case")
    axis.set_ylim(-0.02, 1.02)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(handles=[Patch(color=colours[k % len(colours)], label=e) for k, e in enumerate(experiments)],
                loc="lower left", fontsize="small")
    figure.tight_layout()
    return figure


def voxel_count(image_size: str) -> int:
    """Number of voxels from an ``XxYxZ`` (or any integer-separated) size text."""
    numbers = [int(n) for n in re.findall(r"\d+", str(image_size))]
    if not numbers:
        raise ValueError(f"image size {image_size!r} holds no numbers")
    return int(np.prod(numbers))


def efficiency_plot(tables: Mapping[str, pd.DataFrame]) -> plt.Figure:
    """Time and peak memory per case against image size (million voxels), one series per experiment."""
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
    kinds = set()
    for experiment, table in tables.items():
        size = table["ImageSize"].map(voxel_count) / 1e6
        order = np.argsort(size.to_numpy())
        kind = "/".join(sorted(set(table["MemoryKind"])))
        kinds.add(kind)
        time_axis.plot(size.iloc[order], table["Time"].iloc[order], "o-", label=experiment)
        memory_axis.plot(size.iloc[order], table["MaxGPU_Mem"].iloc[order], "o-", label=f"{experiment} ({kind})")
    memory_name = {"gpu": "peak GPU memory of the process (MB)", "gpu_device": "peak used memory of the whole GPU (MB)",
                   "rss": "peak resident memory, CPU run (MB)"}
    time_axis.set(xlabel="image size (million voxels)", ylabel="running time per case (s)")
    memory_axis.set(xlabel="image size (million voxels)",
                    ylabel=memory_name.get(kinds.pop(), "peak memory (MB)") if len(kinds) == 1 else "peak memory (MB)")
    for axis in (time_axis, memory_axis):
        axis.xaxis.set_major_locator(MaxNLocator(5))
        axis.xaxis.set_major_formatter(StrMethodFormatter("{x:.3g}"))
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


def best_and_worst(metrics: pd.DataFrame, organ_names: Sequence[str]) -> tuple[str, str]:
    """Cases with the highest and lowest organ-mean DSC (ties: first in table order)."""
    score = metrics[[f"{name}_DSC" for name in organ_names]].mean(axis=1)
    return metrics.loc[score.idxmax(), "Name"], metrics.loc[score.idxmin(), "Name"]


def display_slice(gt: np.ndarray, lesion_ids: Sequence[int]) -> int:
    """Axial index with the most lesion voxels; with no lesion, the most foreground voxels."""
    lesion = np.isin(gt, list(lesion_ids))
    counts = (lesion if lesion.any() else gt > 0).sum(axis=(1, 2))
    return int(np.argmax(counts))


def label_colormap(max_id: int) -> ListedColormap:
    """Transparent background, one distinct colour per class id."""
    colours = [(0, 0, 0, 0)] + [plt.get_cmap("tab20")(i % 20) for i in range(max_id)]
    return ListedColormap(colours)


def qualitative_overlays(rows: Sequence[dict], labels: Sequence[Mapping], window: Sequence[float]) -> plt.Figure:
    """Grid of image | ground truth | predictions; ``rows`` items: title, image, gt, predictions, spacing_zyx."""
    max_id = max(entry["id"] for entry in labels)
    cmap = label_colormap(max_id)
    lesion_ids = [entry["id"] for entry in labels if entry["kind"] == "lesion"]
    columns = ["image", "ground truth", *rows[0]["predictions"]]
    figure, axes = plt.subplots(len(rows), len(columns), figsize=(3 * len(columns), 3 * len(rows)), squeeze=False)
    for axes_row, row in zip(axes, rows):
        z = display_slice(row["gt"], lesion_ids)
        aspect = row["spacing_zyx"][1] / row["spacing_zyx"][2]
        panels = [None, row["gt"], *row["predictions"].values()]
        for axis, title, label in zip(axes_row, columns, panels):
            axis.imshow(row["image"][z], cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect)
            if label is not None:
                axis.imshow(label[z], cmap=cmap, vmin=0, vmax=max_id, alpha=0.55, aspect=aspect,
                            interpolation="nearest")
            axis.set_title(title if label is not None else f"{row['title']} (slice {z})", fontsize=9)
            axis.set_axis_off()
    handles = [Patch(color=cmap(entry["id"]), label=entry["name"]) for entry in labels]
    figure.legend(handles=handles, loc="lower center", ncol=min(7, len(handles)), fontsize="small")
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    return figure


def load_overlay_row(title: str, case: str, image_path: str, gt_path: str,
                     predictions: Mapping[str, str]) -> dict:
    """Read one case's image, ground truth and predictions; they must share the image's grid."""
    image, geometry = read_volume(image_path, case)
    gt, gt_geometry = read_label(gt_path, case)
    if gt_geometry.size != geometry.size:
        raise CaseError(case, gt_path, f"ground truth size {gt_geometry.size} != image size {geometry.size}")
    loaded = {}
    for experiment, path in predictions.items():
        label, pred_geometry = read_label(path, case)
        if pred_geometry.size != geometry.size:
            raise CaseError(case, path, f"prediction size {pred_geometry.size} != image size {geometry.size}")
        loaded[experiment] = label
    return {"title": title, "image": image, "gt": gt, "predictions": loaded, "spacing_zyx": geometry.spacing_zyx}


def _read_tsvs(paths: Sequence[str], experiments: Sequence[str]) -> dict[str, pd.DataFrame]:
    if len(paths) != len(experiments):
        raise ValueError(f"{len(experiments)} experiments but {len(paths)} tables")
    return {e: pd.read_csv(p, sep="\t", dtype={"Name": str}) for e, p in zip(experiments, paths)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Report figures.")
    parser.add_argument("--dpi", type=int, default=150)
    commands = parser.add_subparsers(dest="command", required=True)
    box = commands.add_parser("boxplots", help="per-class DSC box plots per experiment")
    box.add_argument("--experiments", nargs="+", required=True)
    box.add_argument("--metrics", nargs="+", required=True, help="metrics.tsv per experiment")
    add_label_map_argument(box)
    eff = commands.add_parser("efficiency", help="time and peak memory against image size")
    eff.add_argument("--experiments", nargs="+", required=True)
    eff.add_argument("--tables", nargs="+", required=True, help="efficiency.tsv per experiment")
    qual = commands.add_parser("qualitative", help="best / worst case overlays")
    qual.add_argument("--rank-metrics", required=True, help="metrics.tsv of the experiment that ranks the cases")
    add_label_map_argument(qual)
    qual.add_argument("--cases", nargs="+", required=True)
    qual.add_argument("--images", nargs="+", required=True, help="in --cases order")
    qual.add_argument("--gt", nargs="+", required=True, help="in --cases order")
    qual.add_argument("--experiments", nargs="+", required=True)
    qual.add_argument("--pred-dirs", nargs="+", required=True, help="per experiment: folder of <case>.nii.gz")
    qual.add_argument("--window", type=float, nargs=2, required=True, help="display window (HU)")
    for sub in (box, eff, qual):
        sub.add_argument("--output", required=True)
    args = parser.parse_args(argv)

    if args.command == "boxplots":
        figure = dsc_boxplots(_read_tsvs(args.metrics, args.experiments), args.label_map)
    elif args.command == "efficiency":
        figure = efficiency_plot(_read_tsvs(args.tables, args.experiments))
    else:
        labels = args.label_map
        images, gts = dict(zip(args.cases, args.images, strict=True)), dict(zip(args.cases, args.gt, strict=True))
        best, worst = best_and_worst(pd.read_csv(args.rank_metrics, sep="\t", dtype={"Name": str}),
                                     [e["name"] for e in labels if e["kind"] == "organ"])
        rows = [load_overlay_row(f"{title}: {case}", case, images[case], gts[case],
                                 {e: os.path.join(d, f"{case}.nii.gz")
                                  for e, d in zip(args.experiments, args.pred_dirs, strict=True)})
                for title, case in (("best", best), ("worst", worst))]
        print(f"best case {best}, worst case {worst}")
        figure = qualitative_overlays(rows, labels, args.window)
    save(figure, args.output, args.dpi)


if __name__ == "__main__":
    main()
