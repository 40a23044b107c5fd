"""Learning curves from nnU-Net's checkpoint log and the c2f training log, as one table and one figure."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from workflow_scripts.evaluation import learning_curves as lc

LABELS = [{"id": 1, "name": "Liver", "kind": "organ"}, {"id": 2, "name": "Spleen", "kind": "organ"},
          {"id": 3, "name": "Lesion", "kind": "lesion"}]


def test_teacher_and_student_logs_become_one_table_and_a_figure(tmp_path) -> None:
    logging = {"train_losses": [1.0, 0.5], "val_losses": [0.9, 0.6], "mean_fg_dice": [0.1, 0.7],
               "dice_per_class_or_region": [[0.2, 0.0], [0.9, 0.5]], "ema_fg_dice": [0.1, 0.2]}
    torch.save({"logging": logging}, tmp_path / "checkpoint_final.pth")
    pd.DataFrame({"epoch": [1, 2, 3], "lr": 0.01, "loss": [3.0, 2.0, 1.0], "coarse_loss": 0, "fine_loss": 0,
                  "val_dice_coarse": 0.5, "val_dice_fine": [0.1, 0.4, 0.8], "seconds": 1.0,
                  "val_dice_fine_1": [0.2, 0.5, 0.9], "val_dice_fine_2": np.nan,
                  "val_dice_fine_3": [0.0, 0.3, 0.7]}).to_csv(tmp_path / "log.tsv", sep="\t", index=False)
    lc.main(["--teacher", str(tmp_path / "checkpoint_final.pth"), "--teacher-classes", "1", "2",
             "--students", f"two_stage={tmp_path / 'log.tsv'}", "--label-map", json.dumps(LABELS),
             "--output-table", str(tmp_path / "curves.tsv"), "--output-figure", str(tmp_path / "curves.png")])
    table = pd.read_csv(tmp_path / "curves.tsv", sep="\t")
    assert table["model"].tolist() == ["teacher"] * 2 + ["two_stage"] * 3
    teacher = table[table["model"] == "teacher"]
    assert teacher["Spleen"].tolist() == [0.0, 0.5] and teacher["Lesion"].isna().all()
    student = table[table["model"] == "two_stage"]
    assert student["Lesion"].tolist() == [0.0, 0.3, 0.7] and student["val_loss"].isna().all()
    assert (tmp_path / "curves.png").stat().st_size > 10_000
