"""The workflow's integration with nnU-Net v2: the per-job environment and the trainer found via nnUNet_extTrainer.

nnU-Net takes its folders (nnUNet_raw / _preprocessed / _results), its worker counts and the location of custom
trainers from environment variables, and reads some of them when its modules are imported. Setting them globally
would make every job share one dataset tree and one worker count, so each CLI calls :func:`configure_environment`
first thing, before it imports anything from ``nnunetv2``.

This folder is the ``nnUNet_extTrainer`` search path: nnU-Net imports every module in it as a top-level module
while looking for a trainer by class name, so it holds nothing but the trainer module (and this file, which nnU-Net
skips).
"""
from __future__ import annotations

import os
from pathlib import Path

EXT_TRAINER_DIR = Path(__file__).resolve().parent
TRAINER_NAME = "nnUNetTrainerConfigurable"
SETTINGS_KEY = "workflow_trainer"  # plans-configuration key holding the trainer's schedule
ALL_MIRRORINGS_3D = 8  # copies of a 3D patch in nnU-Net's mirroring TTA (workflow_scripts/nnunet/mirroring.py)


def nnunet_environment(root: str | os.PathLike | None, threads: int, augmentation_workers: int = 0) -> dict[str, str]:
    """Environment variables for one nnU-Net job.

    ``root`` holds the raw/, preprocessed/ and results/ trees (None when only a trained model folder is used).
    ``threads`` caps nnU-Net's own process pools (preprocessing, export); ``augmentation_workers`` = 0 keeps data
    augmentation in the training process, which avoids spawning workers that each re-import torch on small CPUs.
    """
    ext = str(EXT_TRAINER_DIR)
    previous = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p and p != ext]
    env = {
        "nnUNet_extTrainer": os.pathsep.join([ext, *previous]),
        "nnUNet_def_n_proc": str(threads),
        "nnUNet_n_proc_DA": str(augmentation_workers),
    }
    if root is not None:
        root = Path(root).resolve()
        env.update(
            nnUNet_raw=str(root / "raw"),
            nnUNet_preprocessed=str(root / "preprocessed"),
            nnUNet_results=str(root / "results"),
        )
    return env


def configure_environment(root: str | os.PathLike | None, threads: int, augmentation_workers: int = 0) -> dict[str, str]:
    """Apply :func:`nnunet_environment` to this process (and the processes it spawns) and return it."""
    env = nnunet_environment(root, threads, augmentation_workers)
    os.environ.update(env)
    return env
