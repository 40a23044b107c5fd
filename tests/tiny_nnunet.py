"""Tiny nnU-Net datasets and models for the teacher, predictor and pseudo-label tests (seconds on 2 CPU cores)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from workflow_scripts.nnunet import training
from workflow_scripts.nnunet.dataset import TrainingCase, build_dataset, dataset_name

LABEL_NAMES = {1: "liver", 2: "kidney", 3: "spleen", 14: "lesion"}
CLASSES = [1, 3]  # a subset with a gap: nnU-Net ids 1, 2 map back to 1, 3
SHAPE = (16, 24, 24)  # z, y, x
SPACING_XYZ = (2.0, 2.0, 3.0)
PLANNER, CONFIGURATION = "ExperimentPlanner", "3d_fullres"
TINY = {"patch_size": [8, 16, 16], "features_per_stage": [4, 8, 16]}


def write_array(array: np.ndarray, path: Path, origin=(10.0, -20.0, 5.0)) -> str:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return str(path)


def make_label(seed: int, shape=SHAPE) -> np.ndarray:
    """Boxes of classes 1, 2, 3 and a small lesion (14), shifted a little per case."""
    rng = np.random.default_rng(seed)
    z, y, x = (int(v) for v in rng.integers(0, 3, 3))
    label = np.zeros(shape, np.uint8)
    label[2 + z:12 + z, 2 + y:11 + y, 2 + x:10 + x] = 1
    label[3 + z:10 + z, 13:20, 3 + x:9 + x] = 2
    label[4:11, 4 + y:10 + y, 14:21] = 3
    label[5 + z:7 + z, 4 + y:6 + y, 4 + x:6 + x] = 14
    return label


def make_image(label: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    means = np.zeros(15)
    means[[0, 1, 2, 3, 14]] = [-900, 100, 250, 400, -200]
    return (rng.normal(0, 15, label.shape) + means[label]).astype(np.int16)


def make_case(folder: Path, name: str, seed: int, shape=SHAPE) -> TrainingCase:
    label = make_label(seed, shape)
    return TrainingCase(name, write_array(make_image(label, seed), folder / "images" / f"{name}_0000.nii.gz"),
                        write_array(label, folder / "labels" / f"{name}.nii.gz"))


def settings(epochs: int = 1, iterations: int = 2, save_every: int = 1) -> dict:
    return {"num_epochs": epochs, "num_iterations_per_epoch": iterations, "num_val_iterations_per_epoch": 1,
            "save_every": save_every}


def prepare(tmp: Path, dataset_id: int, n_cases: int = 3, batch_size: int = 2, **trainer_settings) -> dict:
    """Raw dataset, plans, preprocessing and the tiny workflow configuration; nothing trained yet."""
    cases = [make_case(tmp / "data", f"case{i}", i) for i in range(n_cases)]
    root = tmp / "nnunet"
    name = dataset_name(dataset_id, "Tiny")
    dataset = build_dataset(cases, root / "raw" / name, CLASSES, LABEL_NAMES)
    base = training.plan_and_preprocess(root, dataset_id, PLANNER, CONFIGURATION, 1)
    plans = training.configure_plans(json.loads(base.read_text()), PLANNER, CONFIGURATION,
                                    settings(**trainer_settings), batch_size, **TINY)
    (base.parent / f"{training.custom_plans_identifier(PLANNER)}.json").write_text(json.dumps(plans))
    return {"root": root, "name": name, "dataset": dataset, "plans": plans, "cases": cases, "id": dataset_id}


def train(prepared: dict) -> Path:
    """Train (1 epoch of 2 iterations by default) and return checkpoint_final.pth."""
    return training.train(prepared["root"], prepared["id"], PLANNER, CONFIGURATION, "all", "cpu", 1)


def model_dir(prepared: dict) -> Path:
    return training.model_folder(prepared["root"], prepared["name"], PLANNER, CONFIGURATION)


def trained_model(tmp_path_factory, dataset_id: int = 971) -> dict:
    """One trained tiny teacher per test session (per xdist worker), shared by the predictor and pseudo tests."""
    base = tmp_path_factory.getbasetemp() / f"tiny_teacher_{dataset_id}"
    done = base / "prepared.json"
    if done.is_file():
        stored = json.loads(done.read_text())
        return {**stored, "root": Path(stored["root"]), "model": Path(stored["model"]),
                "cases": [TrainingCase(*c) for c in stored["cases"]]}
    prepared = prepare(base, dataset_id, epochs=2, iterations=4)
    train(prepared)
    result = {"root": str(prepared["root"]), "model": str(model_dir(prepared)), "name": prepared["name"],
              "cases": [[c.case, c.image, c.label] for c in prepared["cases"]], "id": dataset_id}
    done.write_text(json.dumps(result))
    return trained_model(tmp_path_factory, dataset_id)
