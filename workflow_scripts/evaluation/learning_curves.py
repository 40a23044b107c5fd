"""Learning curves of every trained model: training loss and validation Dice (mean and per class) per epoch.

Segmentation quality is judged first, and a model that does not learn shows it here before any test-set number:
the teacher's curves come from nnU-Net's own log (``logging`` inside checkpoint_final.pth: train/validation loss
and the "pseudo Dice" of the validation patches per class), the coarse-to-fine students' from their training logs
(loss, and the fine stage's validation Dice per class). One long table (``eval/learning_curves.tsv``) and one figure
(``report/learning_curves.png``) put them side by side.
"""
from __future__ import annotations

import argparse
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..c2f.train import CLASS_DICE_PREFIX  # noqa: E402
from ..io.label_map import add_label_map_argument, label_names  # noqa: E402
from ..io.volumes import atomic_path  # noqa: E402
from .figures import save  # noqa: E402

COLUMNS = ["model", "epoch", "train_loss", "val_loss", "val_dice"]


def nnunet_curves(logging: Mapping[str, Sequence], class_names: Sequence[str], model: str) -> pd.DataFrame:
    """Rows per epoch from nnU-Net's ``my_fantastic_logging`` (classes in the order the model predicts them)."""
    per_class = np.asarray(logging["dice_per_class_or_region"], dtype=float)
    n = len(logging["train_losses"])
    table = pd.DataFrame({
        "model": model,
        "epoch": np.arange(1, n + 1),
        "train_loss": logging["train_losses"],
        "val_loss": logging["val_losses"][:n],
        "val_dice": logging["mean_fg_dice"][:n],
    })
    for index, name in enumerate(class_names):
        table[name] = per_class[:n, index] if per_class.ndim == 2 and per_class.shape[1] > index else np.nan
    return table


def read_nnunet_logging(checkpoint: str) -> dict:
    """The training log nnU-Net stores in its checkpoint (our own trained file, hence weights_only=False)."""
    import torch

    return torch.load(checkpoint, map_location="cpu", weights_only=False)["logging"]


def c2f_curves(log: pd.DataFrame, label_names: Mapping[int, str], model: str) -> pd.DataFrame:
    """Rows per epoch from a coarse-to-fine training log (fine-stage Dice; it has no validation loss)."""
    table = pd.DataFrame({
        "model": model,
        "epoch": log["epoch"],
        "train_loss": log["loss"],
        "val_loss": np.nan,
        "val_dice": log["val_dice_fine"],
    })
    for label_id, name in label_names.items():
        column = f"{CLASS_DICE_PREFIX}{label_id}"
        table[name] = log[column] if column in log else np.nan
    return table


def plot_curves(curves: pd.DataFrame, class_names: Sequence[str]) -> plt.Figure:
    """One column per model: losses on top, per-class validation Dice (thin) and their mean (thick) below."""
    models = list(dict.fromkeys(curves["model"]))
    figure, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6.5), squeeze=False, sharey="row")
    colours = plt.get_cmap("tab20").colors
    for column, model in enumerate(models):
        table = curves[curves["model"] == model]
        top, bottom = axes[0, column], axes[1, column]
        top.plot(table["epoch"], table["train_loss"], label="training loss")
        if table["val_loss"].notna().any():
            top.plot(table["epoch"], table["val_loss"], label="validation loss")
        top.set_title(model)
        top.grid(alpha=0.3)
        top.legend(fontsize="small")
        for k, name in enumerate(class_names):
            if table[name].notna().any():
                bottom.plot(table["epoch"], table[name], lw=0.8, color=colours[k % len(colours)], label=name)
        bottom.plot(table["epoch"], table["val_dice"], lw=2.5, color="black", label="mean")
        bottom.set_ylim(-0.02, 1.02)
        bottom.set_xlabel("epoch")
        bottom.grid(alpha=0.3)
    axes[0, 0].set_ylabel("loss")
    axes[1, 0].set_ylabel("validation Dice")
    axes[1, -1].legend(fontsize="x-small", ncol=2, loc="lower right")
    figure.tight_layout()
    return figure


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", help="the teacher's checkpoint_final.pth")
    parser.add_argument("--teacher-classes", type=int, nargs="*", default=[],
                        help="label ids the teacher learns, in its output order")
    parser.add_argument("--students", nargs="*", default=[], help="NAME=training_log.tsv of each c2f student")
    add_label_map_argument(parser)
    parser.add_argument("--output-table", required=True, help="output TSV")
    parser.add_argument("--output-figure", required=True, help="output PNG")
    parser.add_argument("--dpi", type=int, default=120)
    args = parser.parse_args(argv)
    names = label_names(args.label_map)
    parts = []
    if args.teacher:
        teacher_names = [names[i] for i in args.teacher_classes]
        parts.append(nnunet_curves(read_nnunet_logging(args.teacher), teacher_names, "teacher"))
    for item in args.students:
        model, _, path = item.partition("=")
        parts.append(c2f_curves(pd.read_csv(path, sep="\t"), names, model))
    curves = pd.concat(parts, ignore_index=True).reindex(columns=COLUMNS + list(names.values()))
    with atomic_path(args.output_table) as tmp:
        curves.to_csv(tmp, sep="\t", index=False, float_format="%.4g")
    save(plot_curves(curves, list(names.values())), args.output_figure, args.dpi)
    print(curves.groupby("model")[["train_loss", "val_dice"]].last().to_string())


if __name__ == "__main__":
    main()
