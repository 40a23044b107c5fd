"""The nnU-Net student option: nnU-Net v2 trained on the student labels with a large batch, one model per batch size.

This follows the FLARE24 large-batch paper: nnU-Net's default configuration, only the batch size raised (4 and 8),
trained on the merged labels or on the raw partial labels treated as full labels; two models (batch 4 and 8) are an
ensemble whose prediction averages their softmax.

Everything nnU-Net-specific is shared with the teacher (:mod:`workflow_scripts.nnunet.training`,
:mod:`workflow_scripts.nnunet.dataset`, :mod:`workflow_scripts.nnunet.ext`); this module only composes it:

* the dataset learns every class of the label map; merged labels written with ``merge.low_confidence_as: ignore``
  (or, for the unlabeled cases of an ``unlabeled: true`` experiment, ``merge.unlabeled_low_confidence_as``)
  carry the ignore label (highest id + 1), which dataset.json declares as nnU-Net's ``"ignore"`` label, so those
  voxels add nothing to the loss;
* one plans file holds one configuration per batch size, ``<configuration>_b<batch>_wf``, each inheriting from the
  planned configuration (so all models share one preprocessing) and each trained into its own model folder.

Like the teacher module, nothing imports nnU-Net or torch at module level: rule files import the naming helpers.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Collection, Mapping, Sequence

from ..io.label_map import add_label_map_argument, ignore_label
from ..io.manifest import TrainingCase, read_manifest
from ..io.volumes import CaseError, write_text
from .dataset import build_dataset, dataset_name
from .training import (
    add_nnunet_arguments,
    add_plans_arguments,
    check_expected,
    configure_plans,
    custom_configuration,
    custom_plans_identifier,
    model_folder,
    plan_and_preprocess,
    train,
    trainer_settings,
)

IGNORE_NAME = "ignore"  # the label name nnU-Net v2 treats as "not annotated" (it must have the highest id)


def nnunet_experiments(experiments: Mapping[str, Mapping]) -> list[str]:
    """Names of the student experiments trained with nnU-Net, in config order."""
    return [name for name, spec in experiments.items() if spec.get("model", "c2f") == "nnunet"]


def experiment_dataset_ids(experiments: Mapping[str, Mapping], base_id: int) -> dict[str, int]:
    """nnU-Net dataset id of each nnU-Net experiment: ``base_id`` + its position among them (config order).

    Each experiment has its own nnU-Net tree, but distinct ids keep exported models and a shared nnUNet_results
    unambiguous.
    """
    ids = {name: base_id + index for index, name in enumerate(nnunet_experiments(experiments))}
    too_high = {name: i for name, i in ids.items() if i > 999}
    if too_high:
        raise ValueError(f"nnU-Net dataset ids must be <= 999: lower student.nnunet.dataset_id ({too_high})")
    return ids


def student_dataset_name(dataset_id: int, experiment: str) -> str:
    """The nnU-Net dataset folder name of an experiment, e.g. Dataset902_two_stage_nn."""
    return dataset_name(dataset_id, experiment)


def batch_configuration(configuration: str, batch_size: int | str) -> str:
    """Name of the per-batch-size configuration (before the teacher's ``_wf`` suffix)."""
    return f"{configuration}_b{batch_size}"


def student_model_folder(root: str | Path, dataset: str, planner: str, configuration: str,
                         batch_size: int | str) -> Path:
    """Trained-model folder of the batch-size ``batch_size`` model (rule files pass wildcards as the names)."""
    return model_folder(root, dataset, planner, batch_configuration(configuration, batch_size))


def dataset_classes(labels_config: Sequence[Mapping], with_ignore: bool) -> tuple[list[int], dict[int, str]]:
    """Classes the student learns (every id of the label map) and their names, plus the ignore label if asked.

    The ignore label is one above every class id, so it gets the highest nnU-Net id as nnU-Net requires.
    """
    names = {int(entry["id"]): str(entry["name"]) for entry in labels_config}
    classes = sorted(names)
    if with_ignore:
        ignore = ignore_label(labels_config)
        names[ignore] = IGNORE_NAME
        classes.append(ignore)
    return classes, names


def uses_ignore_label(label_source: str, low_confidence_as: Collection[str]) -> bool:
    """Only merged labels written with ``low_confidence_as: ignore`` contain the ignore label.

    ``low_confidence_as`` holds the setting of every pseudo-labelled category the experiment trains on (weak, and
    unlabeled with its own ``merge.unlabeled_low_confidence_as``): one of them writing the ignore label is enough.
    Declaring it otherwise would switch nnU-Net to its partial-label loss for nothing.
    """
    return label_source == "merged" and "ignore" in low_confidence_as


def build_student_dataset(cases: Sequence[TrainingCase], root: str | Path, labels_config: Sequence[Mapping],
                          with_ignore: bool) -> dict:
    """The nnU-Net raw dataset of a student experiment (see :func:`dataset_classes`); returns dataset.json.

    The folder is rebuilt from scratch (it holds only symlinks and remapped labels): a case that left the split
    must not linger, nnU-Net would train on it or fail its integrity check.
    """
    classes, names = dataset_classes(labels_config, with_ignore)
    for sub in ("imagesTr", "labelsTr", "dataset.json"):
        target = Path(root, sub)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    return build_dataset(cases, root, classes, names)


def student_plans(plans: Mapping, planner: str, configuration: str, trainer_settings: Mapping[str, int],
                  batch_sizes: Sequence[int], patch_size: Sequence[int] | None = None,
                  features_per_stage: Sequence[int] | None = None) -> dict:
    """The planner's plans plus one workflow configuration per batch size (see module doc).

    Each is the teacher's :func:`~workflow_scripts.nnunet.training.configure_plans` configuration for that batch size,
    stored under its own name, so the models differ in nothing but the batch size.
    """
    if len(set(batch_sizes)) != len(batch_sizes) or not batch_sizes:
        raise ValueError(f"batch sizes must be unique and non-empty, got {list(batch_sizes)}")
    result: dict | None = None
    for batch in batch_sizes:
        configured = configure_plans(plans, planner, configuration, trainer_settings, batch, patch_size,
                                     features_per_stage)
        custom = configured["configurations"].pop(custom_configuration(configuration))
        result = result or configured
        result["configurations"][custom_configuration(batch_configuration(configuration, batch))] = custom
    return result


def train_model(root: str | Path, dataset_id: int, planner: str, configuration: str, batch_size: int,
                fold: str | int, device: str, threads: int) -> Path:
    """Train (or resume; a finished run's leftovers are discarded by ``training.train``) the batch-size
    ``batch_size`` model; returns its checkpoint_final.pth."""
    return train(root, dataset_id, planner, batch_configuration(configuration, batch_size), fold, device, threads)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts.nnunet.student",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ds = sub.add_parser("dataset", help="build the nnU-Net raw dataset from a training manifest")
    ds.add_argument("--manifest", required=True, help="TSV with columns case, image, label")
    add_label_map_argument(ds)
    ds.add_argument("--ignore", action="store_true", help="declare the ignore label (highest id + 1)")
    ds.add_argument("--output", required=True, help="dataset folder, e.g. .../raw/Dataset902_two_stage_nn")

    plan = sub.add_parser("plan", help="fingerprint, plan, preprocess and write one configuration per batch size")
    add_nnunet_arguments(plan)
    plan.add_argument("--batch-sizes", type=int, nargs="+", required=True)
    add_plans_arguments(plan)
    plan.add_argument("--output", required=True, help="the workflow plans file the rule declares")

    tr = sub.add_parser("train", help="train or resume one batch size's model")
    add_nnunet_arguments(tr)
    tr.add_argument("--batch-size", type=int, required=True)
    tr.add_argument("--fold", required=True)
    tr.add_argument("--device", choices=["cpu", "cuda"], required=True)
    tr.add_argument("--expect", required=True, help="the checkpoint the rule declares (checked)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.command == "dataset":
        try:
            dataset = build_student_dataset(read_manifest(args.manifest), args.output, args.label_map,
                                            args.ignore)
        except (CaseError, ValueError) as err:  # a bad label or manifest: one clear line naming case and file
            sys.exit(f"error: {err}")
        print(f"{args.output}: {dataset['numTraining']} cases, labels {dataset['labels']}, "
              f"{dataset['labels_rewritten']} label files rewritten (the rest are symlinks)")
    elif args.command == "plan":
        base = plan_and_preprocess(args.root, args.dataset_id, args.planner, args.configuration, args.threads)
        check_expected(base.parent / f"{custom_plans_identifier(args.planner)}.json", args.output)
        plans = student_plans(json.loads(base.read_text()), args.planner, args.configuration, trainer_settings(args),
                              args.batch_sizes, args.patch_size, args.features_per_stage)
        write_text(args.output, json.dumps(plans, indent=2))
        for batch in args.batch_sizes:
            name = custom_configuration(batch_configuration(args.configuration, batch))
            print(f"{args.output}: configuration {name} = {json.dumps(plans['configurations'][name])}")
    else:
        checkpoint = train_model(args.root, args.dataset_id, args.planner, args.configuration, args.batch_size,
                                 args.fold, args.device, args.threads)
        check_expected(checkpoint, args.expect)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
