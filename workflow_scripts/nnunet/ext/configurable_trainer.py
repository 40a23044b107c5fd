"""nnU-Net's default trainer, with the schedule taken from the plans and crash-safe checkpoints.

nnU-Net hard-codes 1000 epochs x 250 iterations and a checkpoint every 50 epochs in ``nnUNetTrainer.__init__``; the
usual way to change them is one trainer class per setting. Here the workflow writes the settings into the plans
configuration it trains (key ``workflow_trainer``, see :mod:`workflow_scripts.nnunet.teacher`), so one class serves every
config, and the trained model folder's plans.json records the schedule that produced it.

The class is found by nnU-Net through ``nnUNet_extTrainer`` (training and inference alike), which imports this file
as a top-level module: imports must therefore be absolute.
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from workflow_scripts.nnunet.ext import SETTINGS_KEY
from workflow_scripts.nnunet.mirroring import BatchedMirroringPredictor
from workflow_scripts.io.volumes import atomic_path

# plans key -> trainer attribute
SETTINGS = {
    "num_epochs": "num_epochs",
    "num_iterations_per_epoch": "num_iterations_per_epoch",
    "num_val_iterations_per_epoch": "num_val_iterations_per_epoch",
    "save_every": "save_every",
}


class nnUNetTrainerConfigurable(nnUNetTrainer):  # noqa: N801 - nnU-Net finds trainers by this naming scheme
    """``nnUNetTrainer`` whose epochs, iterations and checkpoint frequency come from the plans configuration."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        # the parameter names must stay those of nnUNetTrainer: it records them (inspect) for checkpoints
        super().__init__(plans, configuration, fold, dataset_json, device)
        settings = self.configuration_manager.configuration.get(SETTINGS_KEY, {})
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise ValueError(f"unknown {SETTINGS_KEY} settings in the plans: {sorted(unknown)}")
        for key, attribute in SETTINGS.items():
            if key in settings:
                setattr(self, attribute, int(settings[key]))
        self.print_to_log_file(
            f"{SETTINGS_KEY}: epochs {self.num_epochs}, iterations/epoch {self.num_iterations_per_epoch}, "
            f"val iterations {self.num_val_iterations_per_epoch}, checkpoint every {self.save_every} epochs, "
            f"batch size {self.configuration_manager.batch_size}"
        )

    def save_checkpoint(self, filename: str) -> None:
        """Write the checkpoint atomically: a job killed mid-write must leave the previous checkpoint loadable,
        because the rerun resumes from it."""
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)
            return
        with atomic_path(filename) as tmp:
            super().save_checkpoint(str(tmp))

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's final validation, with the mirrored copies of each patch batched (same Dice, a fraction of
        the time: :mod:`workflow_scripts.nnunet.mirroring`). nnU-Net builds its predictor inside this method from
        its module's ``nnUNetPredictor``, so that name is swapped for the duration of the call."""
        original = trainer_module.nnUNetPredictor
        trainer_module.nnUNetPredictor = BatchedMirroringPredictor
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            trainer_module.nnUNetPredictor = original
