"""Tests of the nnU-Net teacher: raw dataset conversion, the workflow plans configuration, the trainer's schedule and
batch size, resuming a killed training, and the validation table."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import tiny_nnunet as tn
from workflow_scripts.nnunet import teacher, training
from workflow_scripts.nnunet.dataset import (
    LABEL_IDS_KEY,
    TrainingCase,
    build_dataset,
    label_ids_of,
    label_mapping,
)
from workflow_scripts.nnunet.ext import SETTINGS_KEY, TRAINER_NAME, configure_environment, nnunet_environment
from workflow_scripts.io.volumes import CaseError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    """Planned and preprocessed tiny teacher dataset with its workflow configuration (batch size 3, not trained)."""
    return tn.prepare(tmp_path_factory.mktemp("teacher"), 981, batch_size=3, epochs=3, iterations=5)


def test_label_mapping_is_consecutive_in_original_order():
    assert label_mapping([13, 1, 3]) == {1: 1, 3: 2, 13: 3}
    with pytest.raises(ValueError, match="unique"):
        label_mapping([1, 1])


def test_dataset_links_images_and_rewrites_remapped_labels(prepared):
    raw = prepared["root"] / "raw" / prepared["name"]
    dataset = json.loads((raw / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "liver": 1, "spleen": 2}
    assert dataset["numTraining"] == 3 and dataset["file_ending"] == ".nii.gz"
    assert label_ids_of(dataset) == {1: 1, 2: 3}
    case = prepared["cases"][0]
    image = raw / "imagesTr" / f"{case.case}_0000.nii.gz"
    assert image.is_symlink() and image.resolve() == Path(case.image).resolve()
    label = raw / "labelsTr" / f"{case.case}.nii.gz"
    assert not label.is_symlink()  # classes 1, 3 become 1, 2; kidney (2) and lesion (14) become background
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
    original = tn.make_label(0)
    expected = np.select([original == 1, original == 3], [1, 2], 0)
    np.testing.assert_array_equal(written, expected)
    assert sitk.ReadImage(str(label)).GetOrigin() == sitk.ReadImage(case.image).GetOrigin()


def test_dataset_links_labels_usable_as_is(tmp_path):
    organs = np.where(tn.make_label(0) == 14, 0, tn.make_label(0)).astype(np.uint8)  # ids 1-3 already consecutive
    case = TrainingCase("c0", tn.write_array(tn.make_image(organs, 0), tmp_path / "c0_0000.nii.gz"),
                        tn.write_array(organs, tmp_path / "c0.nii.gz"))
    dataset = build_dataset([case], tmp_path / "raw" / "Dataset982_x", [1, 2, 3], tn.LABEL_NAMES)
    label = tmp_path / "raw" / "Dataset982_x" / "labelsTr" / "c0.nii.gz"
    assert dataset["labels_rewritten"] == 0 and label.is_symlink()
    assert dataset[LABEL_IDS_KEY] == {"1": 1, "2": 2, "3": 3}
    # with the lesion (14 -> nnU-Net id 4) the same label has to be rewritten
    dataset = build_dataset([tn.make_case(tmp_path, "c0", 0)], tmp_path / "raw" / "Dataset982_x", [1, 2, 3, 14],
                            tn.LABEL_NAMES)
    assert dataset["labels_rewritten"] == 1 and not label.is_symlink()
    assert dataset[LABEL_IDS_KEY] == {"1": 1, "2": 2, "3": 3, "4": 14}


def test_dataset_rebuild_drops_cases_that_left_the_split(tmp_path):
    cases = [tn.make_case(tmp_path, f"c{i}", i) for i in range(2)]
    root = tmp_path / "raw" / "Dataset984_x"
    build_dataset(cases, root, [1], tn.LABEL_NAMES)
    assert build_dataset(cases[1:], root, [1], tn.LABEL_NAMES)["numTraining"] == 1
    assert [p.name for p in (root / "imagesTr").iterdir()] == ["c1_0000.nii.gz"]
    assert [p.name for p in (root / "labelsTr").iterdir()] == ["c1.nii.gz"]


def test_dataset_rejects_unknown_label_values_naming_case_and_file(tmp_path):
    label = tn.make_label(0)
    label[0, 0, 0] = 7
    bad = TrainingCase("bad", tn.write_array(tn.make_image(tn.make_label(0), 0), tmp_path / "bad_0000.nii.gz"),
                       tn.write_array(label, tmp_path / "bad.nii.gz"))
    with pytest.raises(CaseError, match=r"bad.*bad\.nii\.gz.*\[7\]"):
        build_dataset([bad], tmp_path / "raw" / "Dataset983_x", [1], tn.LABEL_NAMES)
    assert not (tmp_path / "raw" / "Dataset983_x" / "dataset.json").exists()
    with pytest.raises(ValueError, match=r"classes \[5\]"):
        build_dataset([bad], tmp_path / "raw" / "Dataset983_x", [5], tn.LABEL_NAMES)


def test_environment_is_per_job_and_finds_the_trainer(tmp_path):
    env = nnunet_environment(tmp_path, threads=3)
    assert env["nnUNet_raw"] == str(tmp_path.resolve() / "raw") and env["nnUNet_n_proc_DA"] == "0"
    assert env["nnUNet_extTrainer"].split(os.pathsep)[0].endswith(os.path.join("nnunet", "ext"))
    assert "nnUNet_raw" not in nnunet_environment(None, 1)


def test_configuration_inherits_and_overrides_only_what_is_set(prepared):
    plans = prepared["plans"]
    custom = plans["configurations"][training.custom_configuration(tn.CONFIGURATION)]
    assert plans["plans_name"] == training.custom_plans_identifier(tn.PLANNER)
    assert custom["inherits_from"] == tn.CONFIGURATION and custom["batch_size"] == 3
    assert custom["patch_size"] == tn.TINY["patch_size"]
    kwargs = custom["architecture"]["arch_kwargs"]
    assert kwargs["features_per_stage"] == tn.TINY["features_per_stage"]
    assert kwargs["n_stages"] == len(kwargs["strides"]) == len(kwargs["kernel_sizes"]) == 3
    assert custom[SETTINGS_KEY]["num_epochs"] == 3
    untouched = training.configure_plans(plans, tn.PLANNER, tn.CONFIGURATION, {})
    assert set(untouched["configurations"]["3d_fullres_wf"]) == {"inherits_from", SETTINGS_KEY}


def test_inconsistent_network_overrides_are_rejected(prepared):
    with pytest.raises(ValueError, match="allows 3"):
        training.configure_plans(prepared["plans"], tn.PLANNER, tn.CONFIGURATION, {}, features_per_stage=[4, 8, 16, 32])
    with pytest.raises(ValueError, match="at least 3"):
        training.configure_plans(prepared["plans"], tn.PLANNER, tn.CONFIGURATION, {}, patch_size=[4, 8, 8])


def test_trainer_uses_the_configured_schedule_and_batch_size(prepared):
    configure_environment(prepared["root"], 1)
    from workflow_scripts.nnunet.ext.configurable_trainer import nnUNetTrainerConfigurable

    configuration = training.custom_configuration(tn.CONFIGURATION)
    trainer = nnUNetTrainerConfigurable({**prepared["plans"], "continue_training": False}, configuration, "all",
                                        prepared["dataset"], device=torch.device("cpu"))
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.save_every) == (3, 5, 1)
    trainer.initialize()
    train_loader, _ = trainer.get_dataloaders()
    batch = next(train_loader)
    assert batch["data"].shape[0] == 3  # the configured batch size, not the planned 2
    assert list(batch["data"].shape[2:]) == tn.TINY["patch_size"]


def test_trainer_takes_optimiser_learning_rate_sampling_and_mirror_axes_from_the_plans(prepared):
    """The learning settings reach nnU-Net: AdamW at the configured rate, the foreground share, and the mirrored
    axes, which are also the axes the mirroring TTA uses (nnU-Net stores them in the checkpoint)."""
    configure_environment(prepared["root"], 1)
    from workflow_scripts.nnunet.ext.configurable_trainer import nnUNetTrainerConfigurable

    configuration = training.custom_configuration(tn.CONFIGURATION)
    settings = {"num_epochs": 2, "optimizer": "adamw", "initial_lr": 0.003, "oversample_foreground_percent": 1.0,
                "mirror_axes": []}
    plans = training.configure_plans(prepared["plans"], tn.PLANNER, tn.CONFIGURATION, settings)
    trainer = nnUNetTrainerConfigurable({**plans, "continue_training": False}, configuration, "all",
                                        prepared["dataset"], device=torch.device("cpu"))
    trainer.initialize()
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.optimizer.param_groups[0]["lr"] == 0.003
    assert trainer.oversample_foreground_percent == 1.0
    assert trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3] == ()
    assert trainer.inference_allowed_mirroring_axes == ()
    default = nnUNetTrainerConfigurable({**prepared["plans"], "continue_training": False}, configuration, "all",
                                        prepared["dataset"], device=torch.device("cpu"))
    default.initialize()
    assert isinstance(default.optimizer, torch.optim.SGD) and default.initial_lr == 0.01
    assert default.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3] == (0, 1, 2)
    bad = training.configure_plans(prepared["plans"], tn.PLANNER, tn.CONFIGURATION, {"optimizer": "lbfgs"})
    with pytest.raises(ValueError, match="sgd or adamw"):
        nnUNetTrainerConfigurable({**bad, "continue_training": False}, configuration, "all", prepared["dataset"],
                                  device=torch.device("cpu"))


def test_progress_plot_is_drawn_at_checkpoints_and_after_the_last_epoch_only(prepared, monkeypatch):
    """nnU-Net redraws progress.png every epoch (~0.9 s of matplotlib per epoch on a CPU core); the trainer keeps
    the redraws for its checkpoint epochs and the last one, and leaves the logger's method as it was."""
    configure_environment(prepared["root"], 1)
    from nnunetv2.training.logging.nnunet_logger import MetaLogger
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from workflow_scripts.nnunet.ext.configurable_trainer import nnUNetTrainerConfigurable

    configuration = training.custom_configuration(tn.CONFIGURATION)
    plans = training.configure_plans(prepared["plans"], tn.PLANNER, tn.CONFIGURATION,
                                     {"num_epochs": 7, "save_every": 3})
    trainer = nnUNetTrainerConfigurable({**plans, "continue_training": False}, configuration, "all",
                                        prepared["dataset"], device=torch.device("cpu"))
    drawn = []
    monkeypatch.setattr(MetaLogger, "plot_progress_png", lambda logger, folder: drawn.append(trainer.current_epoch))

    def nnunet_epoch_end(self) -> None:  # the part of nnU-Net's on_epoch_end that matters here
        self.logger.plot_progress_png(self.output_folder)
        self.current_epoch += 1

    monkeypatch.setattr(nnUNetTrainer, "on_epoch_end", nnunet_epoch_end)
    for _ in range(7):
        trainer.on_epoch_end()
    assert drawn == [2, 5, 6]
    assert "plot_progress_png" not in vars(trainer.logger)


def _train_command(prepared: dict) -> list[str]:
    model = training.model_folder(prepared["root"], prepared["name"], tn.PLANNER, tn.CONFIGURATION)
    return [sys.executable, "-m", "workflow_scripts.nnunet.teacher", "train", "--root", str(prepared["root"]),
            "--dataset-id", str(prepared["id"]), "--planner", tn.PLANNER, "--configuration", tn.CONFIGURATION,
            "--fold", "all", "--device", "cpu", "--threads", "1",
            "--expect", str(model / "fold_all" / "checkpoint_final.pth")]


def test_killed_training_resumes_from_the_latest_checkpoint(prepared):
    fold_dir = training.model_folder(prepared["root"], prepared["name"], tn.PLANNER, tn.CONFIGURATION) / "fold_all"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(_train_command(prepared), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.STDOUT, start_new_session=True)
    latest = fold_dir / "checkpoint_latest.pth"
    deadline = time.monotonic() + 120
    while not latest.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert latest.exists(), "the first run wrote no checkpoint"
    assert not (fold_dir / "checkpoint_final.pth").exists(), "the run finished before it could be killed"
    interrupted_at = torch.load(latest, map_location="cpu", weights_only=False)["current_epoch"]
    assert 1 <= interrupted_at < 3

    second = subprocess.run(_train_command(prepared), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    final = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 3
    epochs_run = [int(line.split("Epoch ")[1]) for line in second.stdout.splitlines() if "Epoch " in line
                  and line.split("Epoch ")[1].strip().isdigit()]
    assert epochs_run and epochs_run[0] == interrupted_at, "the rerun started over instead of continuing"
    assert (fold_dir / "validation" / "summary.json").is_file()


def test_changed_plans_discard_old_checkpoints(tmp_path):
    fold_dir = tmp_path / "model" / "fold_all"
    fold_dir.mkdir(parents=True)
    (tmp_path / "model" / "plans.json").write_text(json.dumps({"a": 1}))
    (tmp_path / "model" / "dataset.json").write_text(json.dumps({"d": 1}))
    (fold_dir / "checkpoint_latest.pth").write_bytes(b"x")
    assert training.discard_stale_checkpoints(fold_dir, {"a": 1}, {"d": 1}) == []
    assert training.discard_stale_checkpoints(fold_dir, {"a": 2}, {"d": 1}) == ["checkpoint_latest.pth"]
    assert not (fold_dir / "checkpoint_latest.pth").exists()


def test_validation_table_uses_original_ids_in_order():
    summary = {"mean": {"2": {"Dice": 0.5}, "1": {"Dice": 0.9}}, "foreground_mean": {"Dice": 0.7},
               "metric_per_case": [{}, {}]}
    table = teacher.validation_table(summary, {LABEL_IDS_KEY: {"1": 1, "2": 3}, "labels": {}}, {1: "liver"}, 0)
    assert table["class_id"].tolist() == [1, 3, 0]
    assert table["class_name"].tolist() == ["liver", "3", "foreground_mean"]
    assert table["dice"].tolist() == [0.9, 0.5, 0.7] and set(table["n_cases"]) == {2}
    assert table["evaluated_on"].str.contains("fold 0").all()


def test_config_section_reaches_the_trainer_settings_through_the_cli_flags():
    """plans_arguments (what the rules pass) parsed by the CLI's parser gives the settings of every config key;
    null optional keys are left out, so nnU-Net keeps its own values."""
    section = {"patch_size": [16, 32, 32], "features_per_stage": None, "epochs": 7, "iterations_per_epoch": 3,
               "val_iterations": 2, "checkpoint_every": 5, "optimizer": "adamw", "initial_lr": 0.003,
               "oversample_foreground": None, "mirror_axes": []}
    parser = argparse.ArgumentParser()
    training.add_plans_arguments(parser)
    args = parser.parse_args(training.plans_arguments(section))
    assert args.patch_size == [16, 32, 32] and args.features_per_stage is None
    assert training.trainer_settings(args) == {
        "num_epochs": 7, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 2, "save_every": 5,
        "optimizer": "adamw", "initial_lr": 0.003, "mirror_axes": []}
    unmirrored = training.plans_arguments({**section, "mirror_axes": None})
    assert "--mirror-axes" not in unmirrored
    assert "mirror_axes" not in training.trainer_settings(parser.parse_args(unmirrored))


def test_parse_fold():
    assert training.parse_fold("all") == "all" and training.parse_fold("3") == 3
    with pytest.raises(ValueError):
        training.parse_fold(5)


def test_model_folder_names_trainer_plans_and_configuration(tmp_path):
    folder = training.model_folder(tmp_path, "Dataset901_Teacher", "nnUNetPlannerResEncM", "3d_fullres")
    assert folder.name == f"{TRAINER_NAME}__nnUNetResEncUNetMPlans_wf__3d_fullres_wf"


def test_rerun_after_finished_training_starts_afresh(tmp_path):
    """Teacher and nnU-Net student: only checkpoint_best.pth left (a finished run whose checkpoint_final.pth
    Snakemake deleted before a rerun) is dropped, so the rerun trains afresh; a killed run keeps it."""
    (tmp_path / "checkpoint_best.pth").write_text("x")
    (tmp_path / "checkpoint_latest.pth").write_text("x")
    assert not training.discard_finished_run(tmp_path)
    (tmp_path / "checkpoint_latest.pth").unlink()
    assert training.discard_finished_run(tmp_path)
    assert not (tmp_path / "checkpoint_best.pth").exists()
    assert not training.discard_finished_run(tmp_path)
