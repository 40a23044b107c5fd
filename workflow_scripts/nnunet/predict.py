"""Fast inference with trained nnU-Net v2 models: model folder(s) + cases in, one label file per case out.

nnU-Net's own ``predict_from_files`` is built for throughput on many cases with worker pools: preprocessing and
export run in *spawned* processes (each re-imports torch, and code calling it must sit under ``__main__``), and the
export resamples the logits of every class back to the input grid with scikit-image on the CPU, which dominates the
time of FLARE-sized volumes. Here everything runs in one process, in order, per case:

1. read the image with :mod:`workflow_scripts.io.volumes` (clear :class:`CaseError` naming case and file);
2. nnU-Net's own preprocessor (transpose, crop to non-zero, normalise, resample) and its sliding-window predictor
   (Gaussian weighting, mirroring TTA when asked), so the logits are nnU-Net's;
3. the export on the model's device with torch: trilinear resampling of the logits to the cropped input grid (the
   counterpart of nnU-Net's order-1 default), softmax, averaging over the models of an ensemble, argmax and the
   maximum probability (the confidence), then transposing back and uncropping the label and confidence maps;
4. nnU-Net's consecutive ids mapped back to the workflow's label ids (dataset.json ``workflow_label_ids``, see
   :mod:`workflow_scripts.nnunet.dataset`) and the caller's writer (e.g. connected-component cleanup + writing).

Models are loaded once (:func:`load_ensemble`) and reused for a whole shard of cases (:func:`predict_shard`).
Several model folders (e.g. the batch-4 and batch-8 students) form an ensemble whose softmax is averaged; they must
predict the same label set.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..evaluation.efficiency import measure_cases, write_efficiency_table
from ..io.label_map import add_label_map_argument
from .dataset import label_ids_of
from .ext import ALL_MIRRORINGS_3D, configure_environment
from ..labels.postprocess import clean_components, rules_from_config
from ..io.volumes import CaseError, Geometry, read_volume, write_volume

# writer(case, labels in workflow ids, confidence in [0, 1] or None, geometry of the input image)
Writer = Callable[[str, np.ndarray, "np.ndarray | None", Geometry], None]


@dataclass
class Ensemble:
    """Loaded models sharing one label set; ``label_ids[k]`` is the workflow id of output channel k."""

    predictors: list  # nnUNetPredictor, one per model folder
    label_ids: np.ndarray
    device: torch.device


def check_model_folder(folder: str | Path, fold: str | int, checkpoint: str) -> Path:
    """The checkpoint file of ``folder``/fold_``fold``; a clear error names what is missing."""
    folder = Path(folder)
    for needed in (folder / "plans.json", folder / "dataset.json", folder / f"fold_{fold}" / checkpoint):
        if not needed.is_file():
            raise FileNotFoundError(f"nnU-Net model {folder} is incomplete: {needed} does not exist "
                                    f"(has the training finished?)")
    return folder / f"fold_{fold}" / checkpoint


def output_label_ids(dataset_json: Mapping, num_heads: int) -> np.ndarray:
    """Workflow label id of each network output channel (0 stays background)."""
    ids = label_ids_of(dataset_json)
    missing = [k for k in range(1, num_heads) if k not in ids]
    if missing:
        raise ValueError(f"dataset.json has no label for network outputs {missing}")
    table = np.array([0] + [ids[k] for k in range(1, num_heads)])
    if table.max() > np.iinfo(np.uint8).max:
        raise ValueError(f"label ids up to {table.max()} do not fit the uint8 label files")
    return table.astype(np.uint8)


def load_ensemble(model_folders: Sequence[str | Path], fold: str | int, device: str, tta: bool,
                  checkpoint: str = "checkpoint_final.pth", threads: int = 1,
                  tta_batch: int = ALL_MIRRORINGS_3D) -> Ensemble:
    """Load every model once (weights on ``device``); ``tta`` enables nnU-Net's mirroring test-time augmentation,
    ``tta_batch`` mirrored copies of a patch at a time (:mod:`workflow_scripts.nnunet.mirroring`)."""
    if not model_folders:
        raise ValueError("no model folder given")
    for folder in model_folders:
        check_model_folder(folder, fold, checkpoint)
    configure_environment(None, threads)  # trainer classes (nnUNet_extTrainer) before nnU-Net is imported
    from .mirroring import BatchedMirroringPredictor

    torch.set_num_threads(threads)
    torch_device = torch.device(device)
    predictors, label_ids = [], None
    for folder in model_folders:
        predictor = BatchedMirroringPredictor(use_mirroring=tta, device=torch_device,
                                              perform_everything_on_device=True, allow_tqdm=False,
                                              mirror_batch=tta_batch)
        predictor.initialize_from_trained_model_folder(str(folder), (fold,), checkpoint)
        if predictor.label_manager.has_regions:
            raise ValueError(f"{folder}: region-based models are not supported")
        ids = output_label_ids(predictor.dataset_json, predictor.label_manager.num_segmentation_heads)
        if label_ids is not None and not np.array_equal(ids, label_ids):
            raise ValueError(f"{folder} predicts labels {ids.tolist()}, the other models {label_ids.tolist()}")
        label_ids = ids
        predictor.network.to(torch_device).eval()
        predictors.append(predictor)
    return Ensemble(predictors, label_ids, torch_device)


def _preprocessing_key(predictor) -> str:
    """Models with equal keys preprocess a case identically, so the ensemble preprocesses it once."""
    conf, plans = predictor.configuration_manager, predictor.plans_manager
    return json.dumps([conf.preprocessor_class.__name__, conf.spacing, conf.normalization_schemes,
                       conf.use_mask_for_norm, conf.configuration.get("resampling_fn_data"),
                       conf.configuration.get("resampling_fn_data_kwargs"), plans.transpose_forward,
                       plans.foreground_intensity_properties_per_channel], sort_keys=True, default=str)


def resize_logits(logits: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Trilinear resize (``align_corners=False``) of (C, D, H, W) logits to ``shape``, done separably: bilinear in
    (H, W), then linear along D. The values are those of one trilinear ``F.interpolate`` up to rounding (tests), in
    a third of its time on a CPU for FLARE-sized volumes (14 x 512 x 100 x 512 from 64 x 45 x 64: 1.3 s vs 3.4 s),
    because most of the output grows along one axis and needs 2 taps per value instead of 8. The result is a view
    whose memory runs (C, H, W, D): reduce it over the channels with :func:`softmax_` and :func:`channel_max`."""
    channels, depth = logits.shape[:2]
    in_plane = F.interpolate(logits, size=tuple(shape[1:]), mode="bilinear", align_corners=False)
    rows = in_plane.reshape(channels, depth, -1).transpose(1, 2)  # (C, H*W, D): linear along the last axis
    resized = F.interpolate(rows, size=int(shape[0]), mode="linear", align_corners=False)
    return resized.transpose(1, 2).reshape(channels, *shape)


def _memory_order(tensor: torch.Tensor) -> list[int]:
    """Dimension order (channels first) in which ``tensor``'s elements lie in memory. Reductions over the channels
    of a transposed view are several times slower in torch than over the same data in memory order (measured on
    a CPU: max 2.9 s vs 1.1 s, sum 4.6 s vs 0.2 s for 14 x 512 x 100 x 512)."""
    return [0, *sorted(range(1, tensor.ndim), key=lambda dim: -tensor.stride(dim))]


def softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the channels (dim 0), in place and in memory order: a FLARE-sized case holds one
    class-probability volume, not two."""
    view = logits.permute(_memory_order(logits))
    view.sub_(view.amax(dim=0, keepdim=True)).exp_()
    view.div_(view.sum(dim=0, keepdim=True))
    return logits


def channel_max(probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.max(probabilities, dim=0)``, computed in memory order."""
    order = _memory_order(probabilities)
    values, indices = torch.max(probabilities.permute(order), dim=0)
    back = [order[1:].index(dim) for dim in range(1, probabilities.ndim)]
    return values.permute(back), indices.permute(back)


def _probabilities(predictor, data: np.ndarray, properties: Mapping, device: torch.device,
                   ) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Softmax of one model inside nnU-Net's crop box (channels first, input axis order), computed on ``device``,
    and that box on the input grid. Outside it nnU-Net predicts background with certainty."""
    logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(data))
    logits = logits.to(device=device, dtype=torch.float32)
    cropped_shape = [int(s) for s in properties["shape_after_cropping_and_before_resampling"]]
    if list(logits.shape[1:]) != cropped_shape:
        logits = resize_logits(logits, cropped_shape)
    probabilities = softmax_(logits)
    backward = predictor.plans_manager.transpose_backward
    box = [slice(int(lo), int(hi)) for lo, hi in properties["bbox_used_for_cropping"]]
    return probabilities.permute(0, *[axis + 1 for axis in backward]), tuple(box[axis] for axis in backward)


@torch.inference_mode()
def predict_volume(ensemble: Ensemble, volume: np.ndarray, spacing_zyx: Sequence[float],
                   with_confidence: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Label map (workflow ids, uint8, shape of ``volume``) and, if asked, the max softmax probability (float32)."""
    data = volume[None].astype(np.float32, copy=False)
    preprocessed: dict[str, tuple[np.ndarray, dict]] = {}
    total = box = None
    for predictor in ensemble.predictors:
        key = _preprocessing_key(predictor)
        if key not in preprocessed:
            preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
            properties = {"spacing": list(spacing_zyx)}
            case_data, _, properties = preprocessor.run_case_npy(
                data, None, properties, predictor.plans_manager, predictor.configuration_manager,
                predictor.dataset_json)
            preprocessed = {key: (case_data, properties)}  # keep one preprocessed copy at a time
        case_data, properties = preprocessed[key]
        probabilities, box = _probabilities(predictor, case_data, properties, ensemble.device)
        total = probabilities if total is None else total.add_(probabilities)
        del probabilities
    if len(ensemble.predictors) > 1:
        total /= len(ensemble.predictors)
    confidence, indices = channel_max(total)
    del total
    lookup = torch.from_numpy(ensemble.label_ids).to(ensemble.device)
    labels = np.zeros(volume.shape, np.uint8)  # background (workflow id 0) outside the crop box
    labels[box] = lookup[indices].cpu().numpy()
    if not with_confidence:
        return labels, None
    full_confidence = np.ones(volume.shape, np.float32)
    full_confidence[box] = confidence.cpu().numpy()
    return labels, full_confidence


def predict_shard(ensemble: Ensemble, cases: Sequence[str], images: Sequence[str], write: Writer,
                  with_confidence: bool = False, sample_interval_s: float = 0.1) -> pd.DataFrame:
    """Predict every case of a shard with the loaded models; one efficiency row per case (read -> write time,
    peak and area of GPU memory, or of resident memory on CPU, see :func:`~workflow_scripts.evaluation.efficiency.measure_cases`)."""
    if len(cases) != len(images):
        raise ValueError(f"{len(cases)} cases but {len(images)} images")

    def run_case(index: int) -> str:
        volume, geometry = read_volume(images[index], cases[index])
        labels, confidence = predict_volume(ensemble, volume, geometry.spacing_zyx, with_confidence)
        write(cases[index], labels, confidence, geometry)
        return "x".join(str(n) for n in geometry.size)

    return measure_cases(cases, run_case, str(ensemble.device), sample_interval_s)


def cleaned_label_writer(outputs: Mapping[str, str], postprocess: Mapping, labels: Sequence[Mapping]) -> Writer:
    """Writer of test-set predictions: connected-component cleanup (config ``postprocess``), one file per case."""
    rules = rules_from_config(postprocess, labels)

    def write(case: str, label: np.ndarray, _confidence: np.ndarray | None, geometry: Geometry) -> None:
        write_volume(outputs[case], clean_components(label, geometry.spacing_zyx, rules), geometry)

    return write


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every CLI that predicts with nnU-Net models (this one, pseudo_labels)."""
    parser.add_argument("--models", nargs="+", required=True, help="trained model folder(s); several = ensemble")
    parser.add_argument("--fold", required=True, help="fold folder to use: all or 0-4")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True, help="mirroring TTA")
    parser.add_argument("--tta-batch", type=int, default=ALL_MIRRORINGS_3D, choices=range(1, ALL_MIRRORINGS_3D + 1),
                        metavar=f"1-{ALL_MIRRORINGS_3D}", help="mirrored copies of a patch per forward pass")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", nargs="+", required=True)
    parser.add_argument("--images", nargs="+", required=True, help="one image per case, same order")
    add_label_map_argument(parser)
    parser.add_argument("--postprocess", required=True, help="the 'postprocess' config section as JSON")


def ensemble_from_args(args: argparse.Namespace) -> Ensemble:
    try:
        return load_ensemble(args.models, args.fold, args.device, args.tta, args.checkpoint, args.threads,
                             args.tta_batch)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts.nnunet.predict",
                                     description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--outputs", nargs="+", required=True, help="one output label file per case, same order")
    parser.add_argument("--efficiency", required=True, help="output TSV, one row per case")
    parser.add_argument("--interval", type=float, default=0.1, help="memory sampling interval in seconds")
    args = parser.parse_args(argv)
    if not len(args.cases) == len(args.images) == len(args.outputs):
        parser.error("--cases, --images and --outputs need the same number of entries")
    ensemble = ensemble_from_args(args)
    write = cleaned_label_writer(dict(zip(args.cases, args.outputs)), json.loads(args.postprocess),
                                 args.label_map)
    try:
        table = predict_shard(ensemble, args.cases, args.images, write, sample_interval_s=args.interval)
    except CaseError as err:
        sys.exit(f"error: {err}")
    write_efficiency_table(args.efficiency, table)


if __name__ == "__main__":
    main()
