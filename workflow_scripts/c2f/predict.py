"""Inference of the coarse-to-fine student on a shard of cases (model loaded once per shard).

Per case: read -> canonical orientation (as in training) -> coarse network on the whole volume resized to the
coarse grid -> connected-component cleanup and foreground box -> box + margin (mm) on the original grid -> fine
network on the crop resized to the fine grid -> argmax -> labels resized back to the crop and placed into the full
volume, all on the device -> component cleanup (organs: largest; lesions: every component above a size) -> the
file's own orientation -> uint8 NIfTI with the input's exact geometry.
No sliding window and no resampling to a target spacing: the two fixed-size forward passes are the whole cost,
which is what makes the student fast.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import data
from .model import EfficientSegNet, StudentSpec, autocast, load_model
from ..evaluation.efficiency import measure_cases, write_efficiency_table
from ..io.label_map import add_label_map_argument
from ..io.orientation import reorientation
from ..labels.postprocess import ComponentRule, clean_components, rules_from_config
from ..io.volumes import CaseError, atomic_path, foreground_box, read_volume, write_volume

# dtypes torch can take straight from numpy; anything else is converted to float32 first
_TORCH_DTYPES = {np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.int32, np.int64, np.float32, np.float64)}


@dataclass
class Student:
    """A loaded model and how to run it."""

    spec: StudentSpec
    coarse: EfficientSegNet
    fine: EfficientSegNet
    device: torch.device
    amp: str

    @classmethod
    def load(cls, path: str | os.PathLike, device: str, amp: str) -> "Student":
        spec, coarse, fine = load_model(path, device)
        return cls(spec, coarse, fine, torch.device(device), amp)

    def classify(self, net: EfficientSegNet, net_input: torch.Tensor, with_confidence: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class-index map (uint8) of ``net`` on a (1, 1, Z, Y, X) input from :func:`c2f_data.model_input`, and with
        ``with_confidence`` its confidence map: uint8 ``round(255 * max softmax probability)``, the encoding of the
        teacher's pseudo-labels (:mod:`workflow_scripts.labels.pseudo`), so the merge's filter reads both alike."""
        logits = self.logits(net, net_input)
        indices = logits.argmax(1)[0].to(torch.uint8)
        if not with_confidence:
            return indices, None
        return indices, confidence_code(torch.softmax(logits.float(), 1).amax(1)[0])

    def logits(self, net: EfficientSegNet, net_input: torch.Tensor) -> torch.Tensor:
        """``net``'s (1, C, Z, Y, X) logits, under the model's autocast."""
        with autocast(self.device, self.amp):
            return net(net_input)


def confidence_code(probability: torch.Tensor) -> torch.Tensor:
    """The uint8 encoding of a max softmax probability, ``round(255 * p)``: :func:`..labels.pseudo.encode_confidence`
    (the teacher's, on numpy arrays) for a tensor that stays on its device."""
    return torch.round(probability * 255).to(torch.uint8)


def to_device(volume: np.ndarray, device: torch.device) -> torch.Tensor:
    """Upload in the file's own integer type and convert there: half the transfer for int16 CT.

    fp16 on CUDA halves the memory of the full-size volume (HU values are exact to about 1 HU in the window).
    """
    if volume.dtype not in _TORCH_DTYPES:
        volume = volume.astype(np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(volume)).to(device)
    return tensor.to(torch.float16 if device.type == "cuda" else torch.float32)


def coarse_box(student: Student, volume: torch.Tensor, spacing_zyx: Sequence[float], margin_mm: float,
               rules: Mapping[int, ComponentRule], with_confidence: bool = False
               ) -> tuple[data.Box | None, torch.Tensor | None]:
    """Foreground box on the original grid, grown by ``margin_mm`` (None when the coarse stage finds nothing), and
    with ``with_confidence`` the coarse stage's confidence map on the original grid (what the fine stage's replaces
    inside the box).

    The coarse labels are cleaned first (on the coarse grid, with its coarser spacing) so a stray false-positive
    island cannot stretch the box across the body.
    """
    shape = tuple(volume.shape)
    net_input = data.model_input(volume, student.spec.window, student.spec.coarse_size)
    indices, confidence = student.classify(student.coarse, net_input, with_confidence)
    if confidence is not None:
        confidence = data.resize_labels(confidence, shape)
    coarse_spacing = [s * n / c for s, n, c in zip(spacing_zyx, shape, student.spec.coarse_size)]
    labels = clean_components(to_label_ids(indices.cpu().numpy(), student.spec.class_ids), coarse_spacing, rules)
    box = foreground_box(labels)
    if box is None:
        return None, confidence
    margin = data.margin_voxels(margin_mm, spacing_zyx)
    return data.expand_box(data.scale_box(box, student.spec.coarse_size, shape), margin, margin, shape), confidence


def to_label_ids(indices: np.ndarray, class_ids: Sequence[int]) -> np.ndarray:
    """Class indices -> the label map's ids, as uint8 (the output type)."""
    return np.asarray(class_ids, dtype=np.uint8)[indices]


def segment(student: Student, volume: np.ndarray, spacing_zyx: Sequence[float], margin_mm: float,
            rules: Mapping[int, ComponentRule]) -> tuple[np.ndarray, data.Box | None]:
    """Label ids (uint8, same shape as ``volume``) and the box the fine stage used (None: whole volume)."""
    labels, box, _ = segment_with_confidence(student, volume, spacing_zyx, margin_mm, rules, False)
    return labels, box


@torch.inference_mode()
def segment_with_confidence(student: Student, volume: np.ndarray, spacing_zyx: Sequence[float], margin_mm: float,
                            rules: Mapping[int, ComponentRule], with_confidence: bool = True
                            ) -> tuple[np.ndarray, data.Box | None, np.ndarray | None]:
    """:func:`segment` plus, with ``with_confidence``, a uint8 confidence map of the same shape: the fine stage's
    inside its box, the coarse stage's outside it (where the coarse stage decided on background). A student used as
    the pseudo-labeller of a later round (README, "Rounds") writes it, so the merge filters its pseudo voxels by
    confidence as it does the teacher's."""
    device_volume = to_device(volume, student.device)
    shape = tuple(device_volume.shape)
    box, confidence = coarse_box(student, device_volume, spacing_zyx, margin_mm, rules, with_confidence)
    fine_box = box or data.whole_box(shape)
    net_input = data.model_input(device_volume[fine_box], student.spec.window, student.spec.fine_size)
    del device_volume  # the fine network's full-resolution activations need the room
    logits = student.logits(student.fine, net_input)
    crop_indices, crop_confidence = resized_argmax(logits, data.box_shape(fine_box), with_confidence)
    del logits
    indices = data.uncrop(crop_indices, fine_box, shape).cpu().numpy()
    labels = clean_components(to_label_ids(indices, student.spec.class_ids), spacing_zyx, rules)
    if confidence is None:
        return labels, box, None
    confidence[fine_box] = crop_confidence
    return labels, box, confidence.cpu().numpy()


def resized_argmax(logits: torch.Tensor, size: Sequence[int], with_confidence: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class-index map (uint8) at ``size`` of a network's (1, C, z, y, x) logits, and with ``with_confidence`` its
    confidence (uint8 ``round(255 * max softmax probability)``, as :meth:`Student.classify` encodes it).

    The logits are resized trilinearly and the argmax taken at ``size``, as nnU-Net resamples its logits to the
    scan's grid; resizing the argmax labels by nearest neighbour instead threw away where between two voxels a
    boundary lies (two_stage organ-average test DSC 0.820 -> 0.837 on benchmark seed 11, same model). One class at
    a time, with a running maximum (and log-sum-exp for the confidence) updated in place, so memory holds a few
    volumes of ``size`` rather than C; float16 on CUDA, as the other full-size volumes.
    """
    carrier = torch.float16 if logits.is_cuda else torch.float32

    def resized(cls: int) -> torch.Tensor:
        return F.interpolate(logits[:, cls:cls + 1].to(carrier), size=tuple(size), mode="trilinear",
                             align_corners=False)[0, 0]

    best = resized(0)
    indices = torch.zeros(best.shape, dtype=torch.uint8, device=logits.device)
    log_total = best.clone() if with_confidence else None
    for cls in range(1, logits.shape[1]):
        channel = resized(cls)
        indices.masked_fill_(channel > best, cls)
        torch.maximum(best, channel, out=best)
        if with_confidence:
            torch.logaddexp(log_total, channel, out=log_total)
    if not with_confidence:
        return indices, None
    return indices, confidence_code(torch.exp((best - log_total).float()))


def predict_case(student: Student, case: str, image_path: str, output_path: str, margin_mm: float,
                 rules: Mapping[int, ComponentRule], confidence_path: str | None = None
                 ) -> tuple[str, data.Box | None]:
    """Read, segment and write one case; returns its size as ``XxYxZ`` (the paper's Table 6 convention) and the
    fine stage's box in the file's own voxel order (None: the coarse stage found nothing and the fine stage saw
    the whole volume).

    The networks work in the canonical orientation (:mod:`workflow_scripts.io.orientation`), as in training, so
    a scan stored with flipped or permuted axes gets the same segmentation in physical space; the labels are
    turned back to the file's own order and written with its exact geometry. With ``confidence_path`` the
    confidence map (:func:`segment_with_confidence`) is written there the same way.
    """
    volume, geometry = read_volume(image_path, case)
    orientation = reorientation(geometry.direction)
    canonical = orientation.to_canonical(volume)
    del volume
    spacing_zyx = orientation.spacing_zyx(geometry.spacing_zyx)
    labels, box, confidence = segment_with_confidence(student, canonical, spacing_zyx, margin_mm, rules,
                                                      confidence_path is not None)
    if confidence is not None:
        write_volume(confidence_path, orientation.from_canonical(confidence), geometry)
    if box is None:
        print(f"{case}: the coarse stage found no foreground; the fine stage ran on the whole volume", flush=True)
    else:
        box = orientation.box_from_canonical(box, canonical.shape)
    write_volume(output_path, orientation.from_canonical(labels), geometry)
    return "x".join(str(n) for n in geometry.size), box


BOX_COLUMNS = ["case", "z0", "z1", "y0", "y1", "x0", "x1"]


def box_row(case: str, box: data.Box | None) -> list:
    """One row of the boxes table: the fine stage's box as voxel index ranges [start, stop), empty when None."""
    return [case, *([v for s in box for v in (s.start, s.stop)] if box is not None else [None] * 6)]


def predict_shard(student: Student, cases: Sequence[str], images: Sequence[str], outputs: Sequence[str],
                  margin_mm: float, rules: Mapping[int, ComponentRule], interval_s: float,
                  confidences: Sequence[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predict every case of a shard, measuring each read->write (:func:`measure_cases`); returns the efficiency
    table and the fine-stage boxes (scored against the truth by :mod:`workflow_scripts.evaluation.c2f_stages`).
    With ``confidences`` (one path per case) each case's confidence map is written too."""
    if not len(cases) == len(images) == len(outputs) == len(confidences or outputs):
        raise ValueError(f"{len(cases)} cases, {len(images)} images, {len(outputs)} outputs"
                         f" and {len(confidences or [])} confidence maps")
    boxes = []

    def run_case(i: int) -> str:
        size, box = predict_case(student, cases[i], images[i], outputs[i], margin_mm, rules,
                                 confidences[i] if confidences else None)
        boxes.append(box_row(cases[i], box))
        return size

    table = measure_cases(cases, run_case, str(student.device), interval_s)
    return table, pd.DataFrame(boxes, columns=BOX_COLUMNS).astype({c: "Int64" for c in BOX_COLUMNS[1:]})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--cases", required=True, nargs="+")
    parser.add_argument("--images", required=True, nargs="+", help="one image per case, same order")
    parser.add_argument("--outputs", required=True, nargs="+", help="one output label file per case, same order")
    parser.add_argument("--efficiency", required=True, help="output TSV, one row per case")
    parser.add_argument("--boxes", help="output TSV: the fine stage's box per case (test set: rule c2f_stages)")
    parser.add_argument("--confidences", nargs="+",
                        help="output confidence map per case, same order (pseudo-labels of a later round)")
    add_label_map_argument(parser)
    parser.add_argument("--postprocess", required=True, help="the 'postprocess' config section as JSON")
    parser.add_argument("--margin-mm", type=float, required=True)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--interval", type=float, default=0.1, help="resource sampling interval in seconds")
    args = parser.parse_args(argv)
    if not len(args.cases) == len(args.images) == len(args.outputs) == len(args.confidences or args.outputs):
        parser.error("--cases, --images, --outputs (and --confidences) need the same number of entries")
    torch.set_num_threads(args.threads)
    rules = rules_from_config(json.loads(args.postprocess), args.label_map)
    student = Student.load(args.model, args.device, args.amp)
    try:
        table, boxes = predict_shard(student, args.cases, args.images, args.outputs, args.margin_mm, rules,
                                     args.interval, args.confidences)
    except CaseError as err:
        sys.exit(f"error: {err}")
    write_efficiency_table(args.efficiency, table)
    if args.boxes:
        with atomic_path(args.boxes) as tmp:
            boxes.to_csv(tmp, sep="\t", index=False)


if __name__ == "__main__":
    main()
