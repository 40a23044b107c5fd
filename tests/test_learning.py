"""The fast guard of learning: the coarse-to-fine student, with the demo config's network and training settings,
learns the synthetic FLARE anatomy (13 organs, overlapping CT intensities) well enough to segment the large organs.

This fails if learning breaks anywhere between the demo data, the label mapping, the loss, the optimiser, the
augmentation and inference (the benchmark bench/learning.py measures how well the whole method learns).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from snakemake.utils import validate

from workflow_scripts.c2f import train as train_mod
from workflow_scripts.c2f.model import StudentSpec
from workflow_scripts.c2f.predict import Student, segment
from workflow_scripts.demo.dataset import DemoParams, flare_ids, generate_case
from workflow_scripts.io.manifest import TrainingCase
from workflow_scripts.io.volumes import write_volume

REPO = Path(__file__).resolve().parents[1]
LARGE_ORGANS = ["Liver", "Spleen", "RK", "LK", "Stomach"]


def demo_config() -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    validate(config, str(REPO / "config" / "schema.yaml"), set_default=True)
    return config


def test_c2f_student_learns_the_large_organs_of_the_synthetic_anatomy(tmp_path) -> None:
    """6 training cases, 250 updates with the demo's training settings on smaller grids (time): the large organs of
    2 unseen cases reach DSC >= 0.6 (an untrained or broken model scores ~0; the demo's 400 updates on 18 cases at
    its full grid reach ~0.9)."""
    torch.set_num_threads(1)
    config = demo_config()
    organ_ids, lesion_id = flare_ids(config["labels"])
    params = DemoParams.from_config({**config["demo"], "shape": [32, 48, 48]})
    cases, held_out = [], []
    for index in range(8):
        synthetic = generate_case(f"learn{index:02d}", "strong", params, organ_ids, lesion_id)
        image, label = tmp_path / f"learn{index:02d}_0000.nii.gz", tmp_path / f"learn{index:02d}.nii.gz"
        write_volume(image, synthetic.image, synthetic.geometry)
        write_volume(label, synthetic.truth, synthetic.geometry)
        (cases if index < 6 else held_out).append((TrainingCase(synthetic.case, str(image), str(label)), synthetic))
    c2f = {**config["student"]["c2f"], "coarse_size": [24, 32, 32], "fine_size": [24, 48, 48], "epochs": 10,
           "iterations_per_epoch": 25, "val_fraction": 0.0}
    ids = [entry["id"] for entry in config["labels"]]
    rows = train_mod.train([case for case, _ in cases], StudentSpec.from_config(c2f, ids),
                           train_mod.TrainSettings.from_config(c2f), None, tmp_path / "work", tmp_path / "model.pt",
                           tmp_path / "log.tsv")
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    student = Student.load(tmp_path / "model.pt", "cpu", "none")
    scores = {name: [] for name in LARGE_ORGANS}
    for _, synthetic in held_out:
        labels, _ = segment(student, synthetic.image, synthetic.geometry.spacing_zyx, c2f["margin_mm"], {})
        for name in LARGE_ORGANS:
            truth, prediction = synthetic.truth == organ_ids[name], labels == organ_ids[name]
            scores[name].append(2 * np.sum(truth & prediction) / (truth.sum() + prediction.sum()))
    means = {name: float(np.mean(values)) for name, values in scores.items()}
    assert np.mean(list(means.values())) >= 0.6, means
    assert min(means.values()) >= 0.3, means
