"""nnU-Net v2 planning, preprocessing and resumable training, shared by the teacher and the nnU-Net student.

nnU-Net is used as a library. Around it this module adds:

* a plans configuration ``<configuration>_wf`` in its own plans file ``<plans>_wf.json`` that ``inherits_from`` the
  planned configuration and overrides only what the config asks for: the batch size (the large-batch variants of
  the FLARE24 paper), a smaller patch and network for CPU demos, and the training schedule read by
  :class:`~workflow_scripts.nnunet.ext.configurable_trainer.nnUNetTrainerConfigurable`. Preprocessed data is
  shared with the planned configuration (same data identifier), so changing the schedule never re-preprocesses;
* resumable training: every run continues from nnU-Net's latest checkpoint (they live next to the declared
  checkpoint_final.pth, undeclared, so Snakemake keeps them), unless the plans changed since it was written;
* the command-line pieces both stages' CLIs share (nnU-Net tree, training schedule, the declared-path check).

Nothing here imports nnU-Net at module level: rule files import the path helpers while Snakemake parses the
workflow, and nnU-Net's spawned workers re-import this module.
"""
from __future__ import annotations

import argparse
import json
import shutil
from copy import deepcopy
from pathlib import Path
from typing import Mapping, Sequence

from .ext import SETTINGS_KEY, TRAINER_NAME, configure_environment

# plans identifier each selectable planner writes (nnU-Net's own names)
PLANS_IDENTIFIERS = {
    "ExperimentPlanner": "nnUNetPlans",
    "nnUNetPlannerResEncM": "nnUNetResEncUNetMPlans",
    "nnUNetPlannerResEncL": "nnUNetResEncUNetLPlans",
    "nnUNetPlannerResEncXL": "nnUNetResEncUNetXLPlans",
}
CUSTOM_SUFFIX = "_wf"
# nnU-Net's planners stop pooling when a feature map edge would drop below this (UNet_featuremap_min_edge_length)
FEATUREMAP_MIN_EDGE = 4
# nnU-Net's deep-supervision loss gives the lowest resolution weight 0 and normalises the rest: with two stages the
# weights sum to 0 and the loss is NaN
MIN_STAGES = 3
CHECKPOINTS = ("checkpoint_latest.pth", "checkpoint_best.pth", "checkpoint_final.pth")


def custom_plans_identifier(planner: str) -> str:
    return PLANS_IDENTIFIERS[planner] + CUSTOM_SUFFIX


def custom_configuration(configuration: str) -> str:
    return configuration + CUSTOM_SUFFIX


def model_folder(root: str | Path, dataset: str, planner: str, configuration: str) -> Path:
    """nnU-Net's trained-model folder (trainer__plans__configuration) under ``root``/results."""
    name = f"{TRAINER_NAME}__{custom_plans_identifier(planner)}__{custom_configuration(configuration)}"
    return Path(root, "results", dataset, name)


def fold_name(fold: str | int) -> str:
    return f"fold_{fold}"


def parse_fold(fold: str | int) -> str | int:
    """'all' or an int 0-4, the way nnU-Net wants it."""
    if str(fold) == "all":
        return "all"
    value = int(fold)
    if not 0 <= value <= 4:
        raise ValueError(f"fold must be 'all' or 0-4, got {fold!r}")
    return value


def plan_and_preprocess(root: str | Path, dataset_id: int, planner: str, configuration: str, processes: int) -> Path:
    """Fingerprint, plan and preprocess ``configuration``; returns the planner's plans file.

    The dataset's preprocessed folder is rebuilt from scratch: nnU-Net only adds to gt_segmentations/ and keeps an
    old splits_final.json, which would be stale for a changed set of training cases.
    """
    # the planner sizes torch's thread pool by nnUNet_n_proc_DA while estimating memory: it must be >= 1 here
    configure_environment(root, processes, augmentation_workers=processes)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    target = Path(root, "preprocessed", convert_id_to_dataset_name(dataset_id))
    if target.exists():
        shutil.rmtree(target)
    extract_fingerprints([dataset_id], num_processes=processes, check_dataset_integrity=True,
                         clean=True, verbose=False, show_progress_bar=False)
    identifier = plan_experiments([dataset_id], planner)
    if identifier != PLANS_IDENTIFIERS[planner]:
        raise RuntimeError(f"{planner} wrote plans {identifier!r}, expected {PLANS_IDENTIFIERS[planner]!r}")
    preprocess([dataset_id], identifier, [configuration], [processes], show_progress_bar=False)
    return target / f"{identifier}.json"


def _fit(values: Sequence[int], length: int) -> list[int]:
    """Truncate a per-stage list, or extend it with its last value."""
    values = list(values)
    return (values + values[-1:] * length)[:length]


def resized_architecture(configuration: Mapping, patch_size: Sequence[int] | None,
                         features_per_stage: Sequence[int] | None) -> tuple[list[int], dict]:
    """Patch size and architecture for a new patch size and/or feature list, consistent with each other.

    Strides and kernel sizes are recomputed with nnU-Net's own topology rule for the planned spacing, so pooling
    stays anisotropic where the spacing is; the number of stages follows the feature list (or, without one, the
    patch size, with nnU-Net's feature doubling). nnU-Net may enlarge the patch to a multiple of its pooling.
    """
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    architecture = deepcopy(dict(configuration["architecture"]))
    kwargs = architecture["arch_kwargs"]
    planned = list(kwargs["features_per_stage"])
    patch = list(patch_size) if patch_size is not None else list(configuration["patch_size"])
    max_pool = len(features_per_stage) - 1 if features_per_stage is not None else 999999
    _, strides, kernels, patch, _ = get_pool_and_conv_props(configuration["spacing"], patch, FEATUREMAP_MIN_EDGE,
                                                            max_pool)
    n_stages = len(strides)
    if n_stages < MIN_STAGES:
        raise ValueError(f"patch size {list(patch)} at spacing {configuration['spacing']} allows {n_stages} stages; "
                         f"nnU-Net's deep supervision needs at least {MIN_STAGES}: use a larger patch size")
    if features_per_stage is not None and n_stages != len(features_per_stage):
        raise ValueError(f"features_per_stage has {len(features_per_stage)} stages, but patch size {list(patch)} at "
                         f"spacing {configuration['spacing']} allows {n_stages}: give one feature count per stage")
    features = (list(features_per_stage) if features_per_stage is not None
                else [min(max(planned), planned[0] * 2**i) for i in range(n_stages)])
    kwargs.update(n_stages=n_stages, features_per_stage=features,
                  kernel_sizes=[list(k) for k in kernels], strides=[list(s) for s in strides])
    for key in ("n_conv_per_stage", "n_blocks_per_stage"):
        if key in kwargs:
            kwargs[key] = _fit(kwargs[key], n_stages)
    kwargs["n_conv_per_stage_decoder"] = _fit(kwargs["n_conv_per_stage_decoder"], n_stages - 1)
    return [int(p) for p in patch], architecture


def configure_plans(plans: Mapping, planner: str, configuration: str, trainer_settings: Mapping[str, object],
                    batch_size: int | None = None, patch_size: Sequence[int] | None = None,
                    features_per_stage: Sequence[int] | None = None) -> dict:
    """The planner's plans plus the workflow configuration (see module doc); ``None`` keeps the planned value."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = deepcopy(dict(plans))
    base = PlansManager(plans).get_configuration(configuration).configuration
    custom: dict = {"inherits_from": configuration, SETTINGS_KEY: dict(trainer_settings)}
    if batch_size is not None:
        custom["batch_size"] = int(batch_size)
    if patch_size is not None or features_per_stage is not None:
        custom["patch_size"], custom["architecture"] = resized_architecture(base, patch_size, features_per_stage)
    plans["plans_name"] = custom_plans_identifier(planner)
    plans["configurations"][custom_configuration(configuration)] = custom
    return plans


def discard_finished_run(fold_dir: str | Path) -> bool:
    """Delete checkpoint_best.pth when it is all that is left of a finished run; return whether it was.

    nnU-Net deletes checkpoint_latest.pth when a training finishes, and Snakemake deletes the declared
    checkpoint_final.pth before it reruns the job (e.g. after the merged labels changed). nnU-Net's resume would then
    fall back to checkpoint_best.pth and merely continue the old model from its best epoch; a rerun must train
    afresh. A killed run always has checkpoint_latest.pth (or nothing worth resuming yet), so it still resumes.
    """
    fold_dir = Path(fold_dir)
    best = fold_dir / "checkpoint_best.pth"
    if best.exists() and not any((fold_dir / name).exists() for name in ("checkpoint_latest.pth",
                                                                         "checkpoint_final.pth")):
        best.unlink()
        return True
    return False


def discard_stale_checkpoints(fold_dir: Path, plans: Mapping, dataset_json: Mapping) -> list[str]:
    """Delete checkpoints written under other plans or another dataset; return the names removed.

    Resuming is right after a kill, wrong after a config change: nnU-Net would silently continue a different
    schedule or network. The model folder's plans.json / dataset.json are nnU-Net's record of what it trained.
    """
    model_dir = fold_dir.parent
    recorded = [model_dir / "plans.json", model_dir / "dataset.json"]
    if not all(p.is_file() for p in recorded):
        same = False
    else:
        same = (json.loads(recorded[0].read_text()) == json.loads(json.dumps(plans))
                and json.loads(recorded[1].read_text()) == json.loads(json.dumps(dataset_json)))
    removed = []
    if not same:
        for name in CHECKPOINTS:
            if (fold_dir / name).exists():
                (fold_dir / name).unlink()
                removed.append(name)
    return removed


def train(root: str | Path, dataset_id: int, planner: str, configuration: str, fold: str | int, device: str,
          threads: int) -> Path:
    """Train (or resume) the workflow configuration; returns checkpoint_final.pth.

    nnU-Net's validation runs at the end (on the held-out fold, or on the training cases for fold 'all').
    """
    augmentation_workers = max(threads - 1, 0) if device == "cuda" else 0
    configure_environment(root, threads, augmentation_workers)
    import torch
    from nnunetv2.run.run_training import run_training

    fold = parse_fold(fold)
    name = dataset_name_of(root, dataset_id)
    preprocessed = Path(root, "preprocessed", name)
    plans = json.loads((preprocessed / f"{custom_plans_identifier(planner)}.json").read_text())
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    fold_dir = model_folder(root, name, planner, configuration) / fold_name(fold)
    removed = discard_stale_checkpoints(fold_dir, plans, dataset_json)
    if removed:
        print(f"plans or dataset changed since the last training: removed {removed}, starting afresh")
    if discard_finished_run(fold_dir):
        print(f"{fold_dir}: only checkpoint_best.pth of a finished run was left, training afresh")
    if device == "cpu":
        torch.set_num_threads(threads)
    run_training(str(dataset_id), custom_configuration(configuration), fold, TRAINER_NAME,
                 custom_plans_identifier(planner), continue_training=True, device=torch.device(device))
    return fold_dir / "checkpoint_final.pth"


def dataset_name_of(root: str | Path, dataset_id: int) -> str:
    """The raw dataset folder name for ``dataset_id`` under ``root``."""
    found = sorted(p.name for p in Path(root, "raw").glob(f"Dataset{dataset_id:03d}_*"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one raw dataset Dataset{dataset_id:03d}_* in {Path(root, 'raw')}, "
                                f"found {found}")
    return found[0]


def add_nnunet_arguments(parser: argparse.ArgumentParser) -> None:
    """Where an nnU-Net job works: its tree, dataset, planner and planned configuration."""
    parser.add_argument("--root", required=True, help="folder holding nnU-Net's raw/, preprocessed/, results/")
    parser.add_argument("--dataset-id", type=int, required=True)
    parser.add_argument("--planner", choices=sorted(PLANS_IDENTIFIERS), required=True)
    parser.add_argument("--configuration", required=True, help="planned configuration, e.g. 3d_fullres")
    parser.add_argument("--threads", type=int, default=1)


def add_plans_arguments(parser: argparse.ArgumentParser) -> None:
    """The training schedule and the architecture overrides of the workflow plans configuration."""
    parser.add_argument("--patch-size", type=int, nargs=3)
    parser.add_argument("--features-per-stage", type=int, nargs="+")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--iterations-per-epoch", type=int, required=True)
    parser.add_argument("--val-iterations", type=int, required=True)
    parser.add_argument("--checkpoint-every", type=int, required=True)
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--initial-lr", type=float, help="nnU-Net's default 0.01 when left out")
    parser.add_argument("--oversample-foreground", type=float,
                        help="share of each batch centred on a foreground class (nnU-Net's default 0.33)")
    parser.add_argument("--mirror-axes", type=int, nargs="*",
                        help="axes mirrored in training and TTA (none given: no mirroring; option left out: all)")


def plans_arguments(section: Mapping) -> list[str]:
    """The flags of :func:`add_plans_arguments` for a config section (``teacher`` or ``student.nnunet``).

    The rules pass these to the CLIs and the tests parse them with the same parser, so a config key reaches the
    trainer's plans settings by one path only; optional keys left null keep nnU-Net's values.
    """
    flags: list[str] = []
    for key in ("patch_size", "features_per_stage"):
        if section[key] is not None:
            flags += [f"--{key.replace('_', '-')}", *(str(v) for v in section[key])]
    for key in ("epochs", "iterations_per_epoch", "val_iterations", "checkpoint_every", "optimizer", "initial_lr",
                "oversample_foreground"):
        if section[key] is not None:
            flags += [f"--{key.replace('_', '-')}", str(section[key])]
    if section["mirror_axes"] is not None:
        flags += ["--mirror-axes", *(str(a) for a in section["mirror_axes"])]
    return flags


def trainer_settings(args: argparse.Namespace) -> dict[str, object]:
    """The schedule and optimisation flags of :func:`add_plans_arguments` as the trainer's plans settings
    (``SETTINGS_KEY``); optional ones left out keep nnU-Net's values."""
    settings = {"num_epochs": args.epochs, "num_iterations_per_epoch": args.iterations_per_epoch,
                "num_val_iterations_per_epoch": args.val_iterations, "save_every": args.checkpoint_every,
                "optimizer": args.optimizer}
    optional = {"initial_lr": args.initial_lr, "oversample_foreground_percent": args.oversample_foreground,
                "mirror_axes": args.mirror_axes}
    settings.update({key: value for key, value in optional.items() if value is not None})
    return settings


def check_expected(actual: Path, expected: str) -> None:
    """Stop when nnU-Net wrote somewhere else than the path the rule declares."""
    if actual.resolve() != Path(expected).resolve():
        raise SystemExit(f"nnU-Net wrote {actual}, but the rule expects {expected}")
