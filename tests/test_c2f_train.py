"""Coarse-to-fine training: schedule, loss with the ignore label, case preparation, resume, and a tiny overfit."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import LABELS, POSTPROCESS
from workflow_scripts.c2f import train as train_mod
from workflow_scripts.io import manifest
from workflow_scripts.c2f.data import IGNORE_INDEX
from workflow_scripts.c2f.model import StudentSpec
from workflow_scripts.c2f.predict import Student, predict_case
from workflow_scripts.labels.postprocess import rules_from_config
from workflow_scripts.io.volumes import CaseError, Geometry, read_label, write_volume

TINY_C2F = {
    "coarse_size": [8, 16, 16], "fine_size": [16, 32, 32], "window": [-325, 325], "margin_mm": 20,
    "train_margin_max_mm": 40, "channels": [8, 16], "coarse_channels": [4, 8], "inplane_pool_levels": 1,
    "epochs": 2, "iterations_per_epoch": 2, "batch_size": 1, "lr": 0.01, "weight_decay": 1e-5, "warmup_epochs": 0,
    "checkpoint_every": 1, "val_fraction": 0.0, "seed": 0, "amp": "fp16", "mirror_axes": [0, 1, 2],
}


def write_blob_case(folder: Path, case: str = "blobs", shape=(16, 32, 32), spacing_xyz=(1.5, 1.5, 2.5),
                    seed: int = 0) -> train_mod.TrainingCase:
    """A synthetic CT: an organ (label 1, +200 HU) and a lesion (label 3, +300 HU) on noisy soft tissue."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    image = rng.normal(-100, 20, shape)
    label = np.zeros(shape, np.uint8)
    organ = ((z - shape[0] / 2) / 4) ** 2 + ((y - 11) / 6) ** 2 + ((x - 11) / 6) ** 2 < 1
    lesion = ((z - shape[0] / 2) / 4) ** 2 + ((y - 21) / 5) ** 2 + ((x - 22) / 5) ** 2 < 1
    image[organ] += 200
    image[lesion] += 300
    label[organ], label[lesion] = 1, 3
    geometry = Geometry(tuple(reversed(shape)), spacing_xyz, (10.0, -5.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    image_path, label_path = folder / f"{case}_0000.nii.gz", folder / f"{case}.nii.gz"
    write_volume(image_path, image.astype(np.int16), geometry)
    write_volume(label_path, label, geometry)
    return train_mod.TrainingCase(case, str(image_path), str(label_path))


def write_manifest(path: Path, cases: list[train_mod.TrainingCase]) -> None:
    """The table rule student_manifest writes."""
    manifest.write_manifest(path, [c.case for c in cases], [c.image for c in cases], [c.label for c in cases])


def run_training(case: train_mod.TrainingCase, work: Path, **overrides) -> list[dict]:
    c2f = {**TINY_C2F, **overrides}
    return train_mod.train([case], StudentSpec.from_config(c2f, [1, 2, 3]), train_mod.TrainSettings.from_config(c2f),
                           4, work / "checkpoints", work / "model.pt", work / "log.tsv")


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    return 2 * np.sum((a == label) & (b == label)) / (np.sum(a == label) + np.sum(b == label))


# --- schedule and loss ------------------------------------------------------------------------------------------

def test_learning_rate_warms_up_linearly_then_decays_by_cosine() -> None:
    lrs = [train_mod.learning_rate(step, 100, 10, 0.01) for step in range(100)]
    assert lrs[:10] == pytest.approx([0.001 * (i + 1) for i in range(10)])
    assert lrs[10] == pytest.approx(0.01)
    assert lrs[55] == pytest.approx(0.005, rel=0.05)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-5
    assert train_mod.learning_rate(0, 10, 0, 0.01) == pytest.approx(0.01)


def test_loss_ignores_ignore_label_voxels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, 5)
    target = torch.randint(0, 4, (2, 3, 5, 5))
    target[:, 0] = IGNORE_INDEX
    changed = logits.clone()
    changed[:, :, 0] = torch.randn(2, 4, 5, 5) * 10  # only where the target is ignored
    assert train_mod.dice_ce_loss(logits, target) == pytest.approx(train_mod.dice_ce_loss(changed, target).item())
    everything_ignored = torch.full_like(target, IGNORE_INDEX)
    assert train_mod.dice_ce_loss(logits, everything_ignored).item() == 0


def test_loss_is_small_for_a_confident_correct_prediction_and_large_otherwise() -> None:
    target = torch.zeros(1, 4, 6, 6, dtype=torch.long)
    target[0, 1:3, 1:4, 1:4] = 1
    target[0, 2:4, 4:6, 0:2] = 2
    good = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 20
    assert train_mod.dice_ce_loss(good, target).item() < 0.01
    assert train_mod.dice_ce_loss(-good, target).item() > 1


def test_hard_dice_scores_present_classes_only() -> None:
    target = torch.tensor([0, 1, 1, 2, 2, IGNORE_INDEX])
    prediction = torch.tensor([0, 1, 0, 2, 2, 1])
    assert train_mod.hard_dice(prediction, target, 4) == pytest.approx((2 / 3 + 1) / 2)
    assert math.isnan(train_mod.hard_dice(torch.zeros(3), torch.zeros(3), 4))


def test_validation_split_is_seeded_and_never_empty_or_total() -> None:
    assert train_mod.split_validation(1, 0.05, 0) == ([0], [])
    train_idx, val_idx = train_mod.split_validation(10, 0.05, 0)
    assert len(val_idx) == 1 and sorted(train_idx + val_idx) == list(range(10))
    assert train_mod.split_validation(10, 0.05, 0) == (train_idx, val_idx)
    assert train_mod.split_validation(40, 0.25, 3)[1] != train_mod.split_validation(40, 0.25, 4)[1]
    assert train_mod.split_validation(5, 0.0, 0) == ([0, 1, 2, 3, 4], [])


# --- preparation --------------------------------------------------------------------------------------------------

def test_prepared_cases_are_cached_and_refreshed_when_the_label_changes(tmp_path) -> None:
    case = write_blob_case(tmp_path)
    spec = StudentSpec.from_config(TINY_C2F, [1, 2, 3])
    [first] = train_mod.prepare_all([case], spec, 40, 4, tmp_path / "cache")
    stamp = first.stat().st_mtime_ns
    assert train_mod.prepare_all([case], spec, 40, 4, tmp_path / "cache") == [first]
    assert first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    os.utime(case.label, ns=(stamp + 10**9, stamp + 10**9))
    [second] = train_mod.prepare_all([case], spec, 40, 4, tmp_path / "cache")
    assert second != first and second.exists()


def test_unknown_label_values_name_the_case_and_file(tmp_path) -> None:
    case = write_blob_case(tmp_path)
    label, geometry = read_label(case.label, case.case)
    label[0, 0, 0] = 9
    write_volume(case.label, label, geometry)
    spec = StudentSpec.from_config(TINY_C2F, [1, 2, 3])
    with pytest.raises(CaseError, match=r"blobs.*blobs\.nii\.gz.*\[9\]"):
        train_mod.prepare(case, spec, 40, ignore_label=4)


def test_label_on_another_grid_is_rejected(tmp_path) -> None:
    case = write_blob_case(tmp_path)
    other = write_blob_case(tmp_path, "other", shape=(16, 32, 30))
    spec = StudentSpec.from_config(TINY_C2F, [1, 2, 3])
    with pytest.raises(CaseError, match="geometry does not match"):
        train_mod.prepare(train_mod.TrainingCase("blobs", case.image, other.label), spec, 40, 4)


# --- training loop ------------------------------------------------------------------------------------------------

def test_killed_training_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(tmp_path, monkeypatch) -> None:
    torch.set_num_threads(1)
    case = write_blob_case(tmp_path)
    full_rows = run_training(case, tmp_path / "full", epochs=3, iterations_per_epoch=1)
    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)

    real_epoch, calls = train_mod.train_epoch, []

    def killed_in_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_epoch", killed_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_training(case, tmp_path / "resumed", epochs=3, iterations_per_epoch=1)
    assert not (tmp_path / "resumed" / "model.pt").exists()
    assert (tmp_path / "resumed" / "checkpoints" / "latest.pt").exists()
    monkeypatch.setattr(train_mod, "train_epoch", real_epoch)
    calls.clear()
    resumed_rows = run_training(case, tmp_path / "resumed", epochs=3, iterations_per_epoch=1)

    resumed = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    for net in ("coarse", "fine"):
        for key, value in full[net].items():
            assert torch.equal(value, resumed[net][key]), f"{net}.{key} differs after resume"
    pd.testing.assert_frame_equal(pd.DataFrame(resumed_rows).drop(columns="seconds"),
                                  pd.DataFrame(full_rows).drop(columns="seconds"))
    log = pd.read_csv(tmp_path / "resumed" / "log.tsv", sep="\t")
    per_class = [f"{train_mod.CLASS_DICE_PREFIX}{i}" for i in (1, 2, 3)]  # the per-class learning curve
    assert list(log.columns) == train_mod.LOG_COLUMNS + per_class and log["epoch"].tolist() == [1, 2, 3]


def test_checkpoint_of_a_different_run_is_not_resumed(tmp_path, capsys) -> None:
    torch.set_num_threads(1)
    case = write_blob_case(tmp_path)
    run_training(case, tmp_path, epochs=1, iterations_per_epoch=1)
    rows = run_training(case, tmp_path, epochs=1, iterations_per_epoch=1, lr=0.005)
    assert "different run" in capsys.readouterr().out
    assert len(rows) == 1


def test_tiny_overfit_reaches_high_dice_on_one_synthetic_case(tmp_path) -> None:
    """Learning works: 100 updates on one case segment both of its objects almost perfectly."""
    torch.set_num_threads(1)
    case = write_blob_case(tmp_path)
    rows = run_training(case, tmp_path, epochs=10, iterations_per_epoch=10)
    assert rows[-1]["fine_loss"] < rows[0]["fine_loss"]
    student = Student.load(tmp_path / "model.pt", "cpu", "none")
    rules = rules_from_config(POSTPROCESS, LABELS)
    predict_case(student, case.case, case.image, str(tmp_path / "pred.nii.gz"), 20, rules)
    prediction, _ = read_label(tmp_path / "pred.nii.gz", case.case)
    truth, _ = read_label(case.label, case.case)
    assert dice(prediction, truth, 1) > 0.9
    assert dice(prediction, truth, 3) > 0.9


def test_cli_trains_from_a_manifest(tmp_path) -> None:
    import json

    case = write_blob_case(tmp_path)
    manifest = tmp_path / "cases.tsv"
    second = write_blob_case(tmp_path, "second", seed=1)
    write_manifest(manifest, [case, second])
    assert train_mod.read_manifest(manifest) == [case, second]
    c2f = {**TINY_C2F, "epochs": 1, "iterations_per_epoch": 1, "val_fraction": 0.5}
    train_mod.main(["--manifest", str(manifest), "--c2f", json.dumps(c2f), "--label-ids", "1", "2", "3",
                    "--ignore-label", "4", "--work-dir", str(tmp_path / "work"), "--model", str(tmp_path / "m.pt"),
                    "--log", str(tmp_path / "log.tsv"), "--threads", "1"])
    log = pd.read_csv(tmp_path / "log.tsv", sep="\t")
    assert len(log) == 1 and 0 <= log.loc[0, "val_dice_fine"] <= 1
    assert (tmp_path / "m.pt").exists()


def test_cli_reports_a_bad_case_by_name(tmp_path) -> None:
    import json

    case = write_blob_case(tmp_path)
    Path(case.image).write_bytes(b"not a nifti")
    manifest = tmp_path / "cases.tsv"
    write_manifest(manifest, [case])
    with pytest.raises(SystemExit, match=r"blobs.*blobs_0000\.nii\.gz"):
        train_mod.main(["--manifest", str(manifest), "--c2f", json.dumps(TINY_C2F), "--label-ids", "1", "2", "3",
                        "--work-dir", str(tmp_path / "work"), "--model", str(tmp_path / "m.pt"),
                        "--log", str(tmp_path / "log.tsv")])
    assert not (tmp_path / "m.pt").exists()


def test_a_case_stored_with_flipped_direction_cosines_trains_on_the_same_arrays(tmp_path) -> None:
    """Training sees every case in the canonical orientation: the same physical scan and label stored with flipped
    x/y direction cosines (mirrored voxel arrays) give identical training arrays and spacing."""
    import SimpleITK as sitk

    case = write_blob_case(tmp_path, shape=(16, 32, 24), spacing_xyz=(1.5, 1.2, 2.5))
    flipped = {}
    for kind, path in (("image", case.image), ("label", case.label)):
        copy = sitk.DICOMOrient(sitk.ReadImage(path), "RAS")  # same physical image, x and y reversed
        assert copy.GetDirection() == (-1, 0, 0, 0, -1, 0, 0, 0, 1)
        flipped[kind] = str(tmp_path / f"flipped_{kind}.nii.gz")
        sitk.WriteImage(copy, flipped[kind])
    spec = StudentSpec.from_config(TINY_C2F, [1, 2, 3])
    original = train_mod.prepare(case, spec, 40, 4)
    mirrored = train_mod.prepare(train_mod.TrainingCase("flipped", flipped["image"], flipped["label"]), spec, 40, 4)
    for field in ("coarse_image", "coarse_label", "region_image", "region_label", "foreground", "spacing_zyx"):
        assert np.array_equal(getattr(mirrored, field), getattr(original, field)), field
