"""Teacher pseudo-labels for weak (and optionally unlabeled) cases: label map plus confidence map per case.

The teacher (an nnU-Net model, see :mod:`workflow_scripts.nnunet.predict`) predicts every case of a shard with
one model load. Per case two files are written into the shard folder:

* ``{case}.nii.gz``: uint8 label map in the workflow's label ids, exactly on the input image's grid, cleaned with
  the connected-component rules of config ``postprocess`` (per organ the largest component by default; voxels
  removed by the cleanup become background);
* ``{case}_confidence.nii.gz``: uint8, value = round(255 * maximum softmax probability) of the network (mirroring
  TTA averaged). One byte per voxel instead of a float keeps the map as small as the label; the merge reads it as
  ``value / 255`` (a resolution of 0.004, far finer than any useful confidence threshold). It describes the
  network's argmax, before the cleanup.

Snakemake then hard-links each case's pair from the shard folder to ``results/pseudo/`` (rule ``pseudo_case``),
so every case is its own artifact in the DAG while the model is loaded once per shard.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .postprocess import ComponentRule, clean_components, rules_from_config
from ..evaluation.efficiency import write_efficiency_table
from ..io.volumes import CaseError, Geometry, write_volume

CONFIDENCE_SUFFIX = "_confidence"


def starts_shard(case: str, shard_size: int) -> bool:
    """Whether a content-defined cut falls before ``case``: its id hashes to 0 modulo ``shard_size``.

    A stable hash (not Python's per-process ``hash``), so every Snakemake process derives the same shards.
    """
    digest = hashlib.blake2b(case.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shard_size == 0


def shard_cases(cases: Sequence[str], shard_size: int) -> dict[str, list[str]]:
    """Cases (in the given order) in shards of ``shard_size`` cases on average, each named after its first case.

    Why not fixed positional shards: adding a weak case, or a case changing category, would shift every later case
    into another shard and rerun all of their pseudo-labelling (hours on thousands of cases). Here a shard ends
    before a case chosen by its id's hash (about one in ``shard_size``), or after ``2 * shard_size`` cases at the
    latest, so such a change reruns the shard around it and leaves the others' members and names as they were.
    """
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    shards: dict[str, list[str]] = {}
    current: list[str] = []
    for case in cases:
        if current and (starts_shard(case, shard_size) or len(current) >= 2 * shard_size):
            current = []
        if not current:
            shards[case] = current
        current.append(case)
    return shards


def shard_of(case: str, shards: Mapping[str, Sequence[str]]) -> str:
    """The shard holding ``case``."""
    for shard, members in shards.items():
        if case in members:
            return shard
    raise ValueError(f"case {case!r} gets no pseudo-label: it is not a weak (or included unlabeled) case")


def case_files(folder: str | os.PathLike, case: str) -> tuple[str, str]:
    """Label and confidence file of ``case`` in ``folder`` (a shard folder or results/pseudo)."""
    return (os.path.join(folder, f"{case}.nii.gz"), os.path.join(folder, f"{case}{CONFIDENCE_SUFFIX}.nii.gz"))


def encode_confidence(probability: np.ndarray) -> np.ndarray:
    """Max softmax probability in [0, 1] -> uint8 ``round(255 * p)`` (see module doc)."""
    return np.rint(np.clip(probability, 0.0, 1.0) * 255).astype(np.uint8)


def decode_confidence(stored: np.ndarray) -> np.ndarray:
    """uint8 confidence map -> probability in [0, 1] (what the merge compares with merge.min_confidence)."""
    return stored.astype(np.float32) / 255


def write_pseudo_label(folder: str | os.PathLike, case: str, label: np.ndarray, confidence: np.ndarray,
                       geometry: Geometry, rules: Mapping[int, ComponentRule]) -> tuple[str, str]:
    """Clean and write one case's pseudo-label and confidence map (each atomically) into ``folder``."""
    label_path, confidence_path = case_files(folder, case)
    write_volume(label_path, clean_components(label, geometry.spacing_zyx, rules), geometry)
    write_volume(confidence_path, encode_confidence(confidence), geometry)
    return label_path, confidence_path


def predict_pseudo_shard(args: argparse.Namespace) -> None:
    """Predict a shard into a fresh folder that appears complete or not at all."""
    # torch and nnU-Net load here, not at import: Snakemake imports this module while parsing the rule files
    from ..nnunet.predict import ensemble_from_args, predict_shard

    rules = rules_from_config(json.loads(args.postprocess), args.label_map)
    ensemble = ensemble_from_args(args)
    out = Path(args.output)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():  # left by a killed attempt: its files (maybe of cases no longer in the shard) must not ship
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    def write(case: str, label: np.ndarray, confidence: np.ndarray | None, geometry: Geometry) -> None:
        write_pseudo_label(tmp, case, label, confidence, geometry, rules)

    try:
        table = predict_shard(ensemble, args.cases, args.images, write, with_confidence=True)
    except CaseError as err:
        sys.exit(f"error: {err}")
    write_efficiency_table(tmp / "efficiency.tsv", table)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from ..nnunet.predict import add_model_arguments

    parser = argparse.ArgumentParser(prog="python -m workflow_scripts.labels.pseudo",
                                     description="Pseudo-label a shard of cases with one model load.")
    add_model_arguments(parser)
    parser.add_argument("--output", required=True, help="shard folder to create")
    args = parser.parse_args(argv)
    if len(args.cases) != len(args.images):
        parser.error("--cases and --images need the same number of entries")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    predict_pseudo_shard(_parse_args(argv))


if __name__ == "__main__":
    main()
