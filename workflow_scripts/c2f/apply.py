"""Segment scans with an exported coarse-to-fine student, outside Snakemake (the FLARE submission interface).

    python -m workflow_scripts.c2f.apply --model two_stage.pt -i scans/ -o segmentations/
    python -m workflow_scripts.c2f.apply --model two_stage.pt -i a_0000.nii.gz b.mha -o segmentations/
    python -m workflow_scripts.c2f.apply --model two_stage.pt -i a_0000.nii.gz -o a.nii.gz

A folder contributes its files ending in ``--suffix`` (default ``_0000.nii.gz``, the nnU-Net / FLARE image
naming); each case is written as ``<case>.nii.gz`` into the output folder, or to ``-o`` itself when that ends in
``.nii.gz`` and one file is given. Any format SimpleITK reads is accepted. Everything else (networks, fine-stage
margin, cleanup, label map, orientation) comes from the model file (:mod:`.export`), and the cases go through the
workflow's own predictor (:func:`.predict.predict_shard`), so a scan gets the same segmentation as in the
workflow. Outputs are uint8 label maps with the input's exact geometry, each written atomically; an unreadable
scan stops the run with an error naming the case and the file, and no output is written for it.
``--efficiency`` writes the workflow's per-case time and memory table.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .export import load_exported
from .predict import predict_shard
from ..evaluation.efficiency import write_efficiency_table
from ..io.volumes import CaseError
from ..labels.postprocess import rules_from_config

IMAGE_SUFFIX = "_0000.nii.gz"
OUTPUT_SUFFIX = ".nii.gz"


@dataclass(frozen=True)
class Job:
    case: str
    image: str
    output: str


def case_id(file_name: str, suffix: str = IMAGE_SUFFIX) -> str:
    """A scan's case id: its file name without ``suffix`` (nnU-Net's channel suffix) or, failing that, without
    ``.nii.gz`` or its last extension (``scan.mha`` -> ``scan``)."""
    for ending in (suffix, OUTPUT_SUFFIX):
        if file_name.endswith(ending) and len(file_name) > len(ending):
            return file_name[: -len(ending)]
    return Path(file_name).stem


def plan_jobs(inputs: Sequence[str], output: str, suffix: str = IMAGE_SUFFIX) -> list[Job]:
    """Which scan goes to which output file; every mistake is found here, before a model is loaded."""
    scans: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.name.endswith(suffix) and not p.name.startswith("."))
            if not found:
                raise ValueError(f"input folder {item} holds no image ending in {suffix!r} (see --suffix)")
            scans += [(case_id(p.name, suffix), str(p)) for p in found]
        elif path.is_file():
            scans.append((case_id(path.name, suffix), str(path)))
        else:
            raise ValueError(f"input {item} does not exist")
    cases = [case for case, _ in scans]
    duplicated = sorted({case for case in cases if cases.count(case) > 1})
    if duplicated:
        raise ValueError(f"several inputs give the same case ids {duplicated}: their outputs would overwrite "
                         f"each other")
    if output.endswith(OUTPUT_SUFFIX):
        if len(scans) != 1 or Path(inputs[0]).is_dir():
            raise ValueError(f"-o {output} names one file: give exactly one input file, or a folder as -o")
        jobs = [Job(scans[0][0], scans[0][1], output)]
    else:
        jobs = [Job(case, image, str(Path(output) / f"{case}{OUTPUT_SUFFIX}")) for case, image in scans]
    inputs_by_path = {os.path.abspath(job.image): job.case for job in jobs}
    clashes = sorted(job.case for job in jobs if os.path.abspath(job.output) in inputs_by_path)
    if clashes:
        raise ValueError(f"the outputs of cases {clashes} would overwrite input scans: choose another -o")
    return jobs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts.c2f.apply", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", required=True, help="an exported student (rule student_export)")
    parser.add_argument("-i", "--input", required=True, nargs="+", help="scan files and/or folders of scans")
    parser.add_argument("-o", "--output", required=True, help="output folder, or one .nii.gz file for one scan")
    parser.add_argument("--suffix", default=IMAGE_SUFFIX, help="file ending of the scans in input folders")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's choice)")
    parser.add_argument("--efficiency", help="also write the per-case time and memory table (TSV) here")
    parser.add_argument("--interval", type=float, default=0.1, help="memory sampling interval in seconds")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        jobs = plan_jobs(args.input, args.output, args.suffix)
        student, settings = load_exported(args.model, args.device)
    except ValueError as err:
        sys.exit(f"error: {err}")
    rules = rules_from_config(settings.postprocess, settings.labels)
    try:
        table, _ = predict_shard(student, [j.case for j in jobs], [j.image for j in jobs], [j.output for j in jobs],
                                 settings.margin_mm, rules, args.interval)
    except CaseError as err:
        sys.exit(f"error: {err}")
    if args.efficiency:
        write_efficiency_table(args.efficiency, table)
    print(f"{len(jobs)} case(s) segmented into {args.output}")


if __name__ == "__main__":
    main()
