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
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from workflow_scripts.nnunet.ext import SETTINGS_KEY
from workflow_scripts.nnunet.mirroring import BatchedMirroringPredictor
from workflow_scripts.io.volumes import atomic_path

# plans key -> (trainer attribute, type): the schedule, and the optimisation settings a short schedule needs
SETTINGS = {
    "num_epochs": ("num_epochs", int),
    "num_iterations_per_epoch": ("num_iterations_per_epoch", int),
    "num_val_iterations_per_epoch": ("num_val_iterations_per_epoch", int),
    "save_every": ("save_every", int),
    "initial_lr": ("initial_lr", float),
    "oversample_foreground_percent": ("oversample_foreground_percent", float),
}
OPTIMIZER_KEY = "optimizer"  # plans key: "sgd" (nnU-Net's default) or "adamw" (nnU-Net's nnUNetTrainerAdam)
MIRROR_AXES_KEY = "mirror_axes"  # plans key: axes mirrored in training, hence in test-time augmentation


class nnUNetTrainerConfigurable(nnUNetTrainer):  # noqa: N801 - nnU-Net finds trainers by this naming scheme
    """``nnUNetTrainer`` whose epochs, iterations and checkpoint frequency come from the plans configuration."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        # the parameter names must stay those of nnUNetTrainer: it records them (inspect) for checkpoints
        super().__init__(plans, configuration, fold, dataset_json, device)
        settings = self.configuration_manager.configuration.get(SETTINGS_KEY, {})
        unknown = set(settings) - set(SETTINGS) - {MIRROR_AXES_KEY, OPTIMIZER_KEY}
        if unknown:
            raise ValueError(f"unknown {SETTINGS_KEY} settings in the plans: {sorted(unknown)}")
        for key, (attribute, kind) in SETTINGS.items():
            if key in settings:
                setattr(self, attribute, kind(settings[key]))
        self.mirror_axes = (
            tuple(int(a) for a in settings[MIRROR_AXES_KEY]) if settings.get(MIRROR_AXES_KEY) is not None else None
        )
        self.optimizer_name = settings.get(OPTIMIZER_KEY, "sgd")
        if self.optimizer_name not in ("sgd", "adamw"):
            raise ValueError(f"{SETTINGS_KEY}.{OPTIMIZER_KEY} must be sgd or adamw, got {self.optimizer_name!r}")
        self.print_to_log_file(
            f"{SETTINGS_KEY}: optimizer {self.optimizer_name}, epochs {self.num_epochs}, iterations/epoch {self.num_iterations_per_epoch}, "
            f"val iterations {self.num_val_iterations_per_epoch}, checkpoint every {self.save_every} epochs, "
            f"batch size {self.configuration_manager.batch_size}, initial lr {self.initial_lr}, "
            f"foreground oversampling {self.oversample_foreground_percent}, "
            f"mirror axes {'nnU-Net default' if self.mirror_axes is None else self.mirror_axes}"
        )

    def configure_optimizers(self):
        """nnU-Net's SGD (Nesterov, momentum 0.99), or the AdamW of nnU-Net's own ``nnUNetTrainerAdam`` variant;
        both with nnU-Net's polynomial decay. AdamW reaches useful Dice in far fewer iterations, which is what a
        CPU-sized schedule of a few thousand iterations needs (README, "Learning")."""
        if self.optimizer_name == "sgd":
            return super().configure_optimizers()
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay,
                                      amsgrad=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """nnU-Net's choice, with the mirrored axes replaced when the plans set them.

        The mirrored axes are also the axes of mirroring test-time augmentation (nnU-Net stores them in the
        checkpoint as ``inference_allowed_mirroring_axes``), so TTA only ever mirrors what training taught.
        """
        rotation, dummy_2d, initial_patch_size, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if self.mirror_axes is not None:
            mirror_axes = self.mirror_axes
            self.inference_allowed_mirroring_axes = mirror_axes
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def on_epoch_end(self) -> None:
        """nnU-Net's epoch end, with ``progress.png`` redrawn only at checkpoints and after the last epoch.

        nnU-Net redraws the plot every epoch; matplotlib takes ~0.9 s for it on one CPU core: 133 s beside 310 s of
        training in a 150-epoch demo teacher (epochs of ~2 s). The numbers behind it are logged every epoch as before.
        """
        epoch = self.current_epoch
        if (epoch + 1) % self.save_every == 0 or epoch == self.num_epochs - 1:
            super().on_epoch_end()
            return
        self.logger.plot_progress_png = lambda output_folder: None  # shadows the method for this call only
        try:
            super().on_epoch_end()
        finally:
            del self.logger.plot_progress_png

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
