"""One self-contained file of a trained coarse-to-fine student, to segment scans outside the workflow.

``model_final.pt`` (:mod:`.train`) holds the networks' spec and weights. Applying them as the workflow does also
needs what the workflow passes on the command line: the fine stage's margin and the mixed precision
(``student.c2f.margin_mm``, ``.amp``), the connected-component cleanup (``postprocess``) with the label map it
reads class kinds from (``labels``), and the orientation the networks work in. An exported file holds all of it,
so ``python -m workflow_scripts.c2f.apply --model FILE -i IN -o OUT`` (:mod:`.apply`) needs nothing else, as a
FLARE submission must. It is a plain ``torch.save`` dictionary of tensors, numbers, strings, lists and dicts,
opened with ``weights_only=True``, so loading a file from elsewhere runs no pickled code.

Rule: ``student_export`` (rules/student.smk) -> ``results/student/<experiment>/export/<experiment>.pt``.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from .model import networks_from_payload
from .predict import Student
from ..io.label_map import add_label_map_argument
from ..io.orientation import CANONICAL
from ..io.volumes import atomic_path

FORMAT = "wlseg-c2f-student"
VERSION = 1


@dataclass(frozen=True)
class InferenceSettings:
    """How the workflow applies the networks; stored in the exported file next to them."""

    margin_mm: float  # student.c2f.margin_mm
    amp: str  # student.c2f.amp: none | fp16 | bf16 (CUDA only)
    postprocess: dict  # the postprocess config section
    labels: list  # the label map (config labels): ids, names and kinds organ / lesion
    orientation: str = CANONICAL  # the orientation the networks saw in training


def export_student(model: str | os.PathLike, output: str | os.PathLike, settings: InferenceSettings,
                   experiment: str) -> None:
    """Write ``model`` (a :func:`~.model.save_model` file) plus ``settings`` as one exported file, atomically."""
    payload = torch.load(model, map_location="cpu", weights_only=True)
    label_ids = {int(entry["id"]) for entry in settings.labels}
    unknown = sorted(set(payload["spec"]["class_ids"][1:]) - label_ids)
    if unknown:
        raise ValueError(f"{model} predicts label ids {unknown} that the label map lacks (known: {sorted(label_ids)})")
    payload.update(format=FORMAT, version=VERSION, experiment=experiment, inference=asdict(settings))
    with atomic_path(output) as tmp:
        torch.save(payload, tmp)


def load_exported(path: str | os.PathLike, device: str) -> tuple[Student, InferenceSettings]:
    """The networks of an exported file, on ``device`` in eval mode, and its inference settings.

    A file that is not an export (e.g. a bare ``model_final.pt``, which lacks the settings) or that comes from a
    newer format is refused with the reason, rather than applied with guessed settings.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"model file {path} cannot be read: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"model file {path} is not an exported coarse-to-fine student (rule student_export "
                         f"writes one: results/student/<experiment>/export/<experiment>.pt)")
    if payload["version"] > VERSION:
        raise ValueError(f"model file {path} has export format version {payload['version']}; this code reads "
                         f"up to {VERSION}")
    settings = InferenceSettings(**payload["inference"])
    if settings.orientation != CANONICAL:
        raise ValueError(f"model file {path} was trained in orientation {settings.orientation}; this code "
                         f"predicts in {CANONICAL}")
    spec, coarse, fine = networks_from_payload(payload, device)
    return Student(spec, coarse, fine, torch.device(device), settings.amp), settings


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts.c2f.export",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the trained model (model_final.pt)")
    parser.add_argument("--output", required=True, help="the exported file")
    parser.add_argument("--experiment", required=True, help="experiment name, recorded in the file")
    parser.add_argument("--margin-mm", type=float, required=True, help="student.c2f.margin_mm")
    parser.add_argument("--amp", required=True, choices=["none", "fp16", "bf16"], help="student.c2f.amp")
    add_label_map_argument(parser)
    parser.add_argument("--postprocess", required=True, help="the 'postprocess' config section as JSON")
    args = parser.parse_args(argv)
    settings = InferenceSettings(args.margin_mm, args.amp, json.loads(args.postprocess), args.label_map)
    try:
        export_student(args.model, args.output, settings, args.experiment)
    except ValueError as err:
        sys.exit(f"error: {err}")
    print(f"exported {args.experiment} to {args.output}")


if __name__ == "__main__":
    main()
