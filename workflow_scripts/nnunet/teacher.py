"""The nnU-Net v2 teacher: CLI of its stage (plan and preprocess, configure, train, validation table).

The nnU-Net work itself (workflow plans configuration, resumable training) is :mod:`workflow_scripts.nnunet.training`,
which the nnU-Net student shares; the teacher adds its own per-class validation table with the original label ids.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from ..io.label_map import add_label_map_argument, label_names
from ..io.volumes import write_text
from .dataset import label_ids_of
from .training import (
    add_nnunet_arguments,
    add_plans_arguments,
    check_expected,
    configure_plans,
    custom_configuration,
    plan_and_preprocess,
    train,
    trainer_settings,
)


def validation_table(summary: Mapping, dataset_json: Mapping, label_names: Mapping[int, str],
                     fold: str | int) -> pd.DataFrame:
    """Per-class Dice of nnU-Net's final validation, with the original label ids, plus the foreground mean."""
    ids = label_ids_of(dataset_json)
    evaluated_on = ("training cases (fold all: the model has seen them)" if str(fold) == "all"
                    else f"held-out cases of cross-validation fold {fold}")
    n_cases = len(summary["metric_per_case"])
    rows = [
        {"class_id": ids[int(key)], "class_name": label_names.get(ids[int(key)], str(ids[int(key)])),
         "dice": metrics["Dice"], "n_cases": n_cases, "evaluated_on": evaluated_on}
        for key, metrics in sorted(summary["mean"].items(), key=lambda item: int(item[0]))
    ]
    rows.append({"class_id": 0, "class_name": "foreground_mean", "dice": summary["foreground_mean"]["Dice"],
                 "n_cases": n_cases, "evaluated_on": evaluated_on})
    return pd.DataFrame(rows)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts.nnunet.teacher", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("preprocess", help="fingerprint, plan and preprocess")
    add_nnunet_arguments(prep)
    prep.add_argument("--expect", required=True, help="the plans file the rule declares (checked)")

    conf = sub.add_parser("configure", help="write the workflow plans configuration")
    add_nnunet_arguments(conf)
    conf.add_argument("--base-plans", required=True)
    conf.add_argument("--output", required=True)
    conf.add_argument("--batch-size", type=int)
    add_plans_arguments(conf)

    tr = sub.add_parser("train", help="train or resume")
    add_nnunet_arguments(tr)
    tr.add_argument("--fold", required=True)
    tr.add_argument("--device", choices=["cpu", "cuda"], required=True)
    tr.add_argument("--expect", required=True, help="the checkpoint the rule declares (checked)")

    val = sub.add_parser("validation", help="per-class validation Dice table")
    val.add_argument("--summary", required=True, help="nnU-Net's validation/summary.json")
    val.add_argument("--dataset-json", required=True)
    add_label_map_argument(val)
    val.add_argument("--fold", required=True)
    val.add_argument("--output", required=True)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.command == "preprocess":
        plans_file = plan_and_preprocess(args.root, args.dataset_id, args.planner, args.configuration, args.threads)
        check_expected(plans_file, args.expect)
    elif args.command == "configure":
        plans = configure_plans(json.loads(Path(args.base_plans).read_text()), args.planner, args.configuration,
                                trainer_settings(args), args.batch_size, args.patch_size, args.features_per_stage)
        custom = plans["configurations"][custom_configuration(args.configuration)]
        write_text(args.output, json.dumps(plans, indent=2))
        print(f"{args.output}: configuration {custom_configuration(args.configuration)} = {json.dumps(custom)}")
    elif args.command == "train":
        checkpoint = train(args.root, args.dataset_id, args.planner, args.configuration, args.fold, args.device,
                           args.threads)
        check_expected(checkpoint, args.expect)
    else:
        table = validation_table(json.loads(Path(args.summary).read_text()),
                                 json.loads(Path(args.dataset_json).read_text()), label_names(args.label_map), args.fold)
        write_text(args.output, table.to_csv(sep="\t", index=False))
        print(table.to_string(index=False))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
