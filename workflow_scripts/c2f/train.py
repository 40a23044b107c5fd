"""Training of the coarse-to-fine student (both stages in one loop, one schedule, one checkpoint).

Every iteration draws ``batch_size`` cases; the coarse network sees them whole at the coarse size, the fine network
a crop around their labelled foreground with a random margin, augmented as in the paper's Table 1. Loss is Dice +
cross-entropy with the merge stage's ignore label excluded from both terms; AdamW with linear warm-up then cosine
decay. Each case is read once and cached on disk in a training-ready form (like nnU-Net's preprocessing), so
iterations never decompress NIfTI files. Checkpoints (weights, optimiser, RNG states, log) are written outside the
declared outputs every ``checkpoint_every`` epochs, so a killed job resumes exactly where it stopped. Every case is
brought to the canonical orientation first (:mod:`workflow_scripts.io.orientation`), so scans stored with flipped or
permuted axes teach the networks the same anatomy; inference does the same.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import data
from .model import StudentSpec, autocast, save_model
from ..io.manifest import TrainingCase, read_manifest
from ..io.orientation import CANONICAL, reorientation
from ..io.volumes import CaseError, atomic_path, read_label, read_volume

LOG_COLUMNS = ["epoch", "lr", "loss", "coarse_loss", "fine_loss", "val_dice_coarse", "val_dice_fine", "seconds"]
CLASS_DICE_PREFIX = "val_dice_fine_"  # + label id: the fine stage's validation Dice of one class


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation and sampling settings from the ``student.c2f`` config section."""

    epochs: int
    iterations_per_epoch: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: int
    checkpoint_every: int
    val_fraction: float
    seed: int
    margin_mm: float
    train_margin_max_mm: float
    amp: str
    mirror_axes: tuple[int, ...]

    @classmethod
    def from_config(cls, c2f: dict) -> "TrainSettings":
        values = {name: c2f[name] for name in cls.__dataclass_fields__}
        values["mirror_axes"] = tuple(int(a) for a in values["mirror_axes"])
        return cls(**values)


# --- preparation -------------------------------------------------------------------------------------------------

def cache_key(case: TrainingCase, spec: StudentSpec, train_margin_max_mm: float, ignore_label: int | None) -> str:
    """Hash of everything a prepared case depends on: the files (path, size, mtime) and the preparation settings.

    A re-merged label or a changed window gives a new key, so a stale cache entry is never used. The canonical
    orientation is part of it: entries prepared in a file's own axis order (before orientation) are not reused.
    """
    parts = [case.case, CANONICAL, spec.window, spec.coarse_size, spec.class_ids, train_margin_max_mm, ignore_label]
    for path in (case.image, case.label):
        stat = os.stat(path)
        parts += [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def prepare(case: TrainingCase, spec: StudentSpec, train_margin_max_mm: float,
            ignore_label: int | None) -> data.PreparedCase:
    """Read one case and build its training arrays; input problems become CaseErrors naming case and file."""
    image, image_geometry = read_volume(case.image, case.case)
    label, label_geometry = read_label(case.label, case.case)
    mismatch = label_geometry.mismatch(image_geometry)
    if mismatch:
        raise CaseError(case.case, case.label, f"label geometry does not match the image: {mismatch}")
    try:
        indices = data.to_class_indices(label, data.label_lookup(spec.class_ids, ignore_label))
    except ValueError as err:
        raise CaseError(case.case, case.label, str(err)) from err
    orientation = reorientation(image_geometry.direction)  # the networks learn in the canonical orientation
    return data.prepare_case(orientation.to_canonical(image), orientation.to_canonical(indices),
                             orientation.spacing_zyx(image_geometry.spacing_zyx), spec.window, spec.coarse_size,
                             train_margin_max_mm)


def prepare_all(cases: Sequence[TrainingCase], spec: StudentSpec, train_margin_max_mm: float,
                ignore_label: int | None, cache_dir: Path) -> list[Path]:
    """Prepared-case files for all cases, building only the ones missing from the cache."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for case in cases:
        path = cache_dir / f"{case.case}-{cache_key(case, spec, train_margin_max_mm, ignore_label)}.npz"
        if not path.exists():
            with atomic_path(path) as tmp:
                prepare(case, spec, train_margin_max_mm, ignore_label).save(tmp)
        files.append(path)
    return files


def split_validation(n_cases: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, validation) index split; at least one validation case when asked for any, never all."""
    order = np.random.default_rng(seed).permutation(n_cases).tolist()
    n_val = int(round(n_cases * fraction))
    if fraction > 0 and n_cases >= 2:
        n_val = min(max(n_val, 1), n_cases - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


def split_cases(cases: Sequence[TrainingCase], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) indices of ``cases``: validation cases are drawn from the annotated cases only.

    An unlabeled case's label is the teacher's pseudo-label; validating on it would measure agreement with the
    teacher, not learning. Unlabeled cases therefore always train, and the annotated cases are split exactly as
    :func:`split_validation` splits them without any unlabeled case, so adding unlabeled cases leaves the
    validation set (and the learning curve) of an experiment as it was.
    """
    annotated = [index for index, case in enumerate(cases) if not case.unlabeled]
    _, val_positions = split_validation(len(annotated), fraction, seed)
    validation = [annotated[position] for position in val_positions]
    return sorted(set(range(len(cases))) - set(validation)), validation


# --- optimisation ------------------------------------------------------------------------------------------------

def learning_rate(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = data.IGNORE_INDEX,
                 smooth: float = 1e-5) -> torch.Tensor:
    """Cross-entropy + (1 - soft Dice over foreground classes), both skipping ``ignore_index`` voxels.

    Dice is computed over the whole batch (one score per class), which is stable when a class is absent from one
    sample; background is left out of Dice because it would dominate it.
    """
    target = target.long()
    valid = target != ignore_index
    if not valid.any():
        return logits.sum() * 0.0  # nothing annotated: no gradient, but keep the graph
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index)
    mask = valid.unsqueeze(1).float()
    probs = torch.softmax(logits.float(), dim=1) * mask
    onehot = F.one_hot(torch.where(valid, target, 0), logits.shape[1]).movedim(-1, 1).float() * mask
    dims = (0, *range(2, logits.ndim))
    intersection = (probs * onehot).sum(dims)
    dice = (2 * intersection + smooth) / (probs.sum(dims) + onehot.sum(dims) + smooth)
    return ce + (1 - dice[1:].mean())


def class_dice(prediction: torch.Tensor, target: torch.Tensor, n_classes: int,
               ignore_index: int = data.IGNORE_INDEX) -> np.ndarray:
    """Hard Dice per foreground class index 1..n-1; NaN where the class is in neither (ignored voxels skipped)."""
    valid = target != ignore_index
    scores = np.full(n_classes - 1, np.nan)
    for cls in range(1, n_classes):
        pred, true = (prediction == cls) & valid, (target == cls) & valid
        total = int(pred.sum() + true.sum())
        if total:
            scores[cls - 1] = 2 * int((pred & true).sum()) / total
    return scores


def hard_dice(prediction: torch.Tensor, target: torch.Tensor, n_classes: int,
              ignore_index: int = data.IGNORE_INDEX) -> float:
    """Mean Dice over the foreground classes present in the target or the prediction (ignored voxels skipped)."""
    return _nanmean(class_dice(prediction, target, n_classes, ignore_index).tolist())


# --- loop --------------------------------------------------------------------------------------------------------

@dataclass
class Networks:
    coarse: torch.nn.Module
    fine: torch.nn.Module
    optimiser: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


def build_networks(spec: StudentSpec, settings: TrainSettings, device: torch.device) -> Networks:
    coarse, fine = spec.build()
    coarse, fine = coarse.to(device), fine.to(device)
    optimiser = torch.optim.AdamW([*coarse.parameters(), *fine.parameters()], lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and settings.amp == "fp16")
    return Networks(coarse, fine, optimiser, scaler)


def train_epoch(nets: Networks, files: Sequence[Path], train_idx: Sequence[int], spec: StudentSpec,
                settings: TrainSettings, epoch: int, rng: np.random.Generator, pipeline,
                device: torch.device) -> dict:
    """One epoch of joint coarse + fine updates; returns mean losses and the last learning rate."""
    nets.coarse.train()
    nets.fine.train()
    total_steps = settings.epochs * settings.iterations_per_epoch
    warmup_steps = settings.warmup_epochs * settings.iterations_per_epoch
    sums = np.zeros(2)
    for iteration in range(settings.iterations_per_epoch):
        lr = learning_rate(epoch * settings.iterations_per_epoch + iteration, total_steps, warmup_steps, settings.lr)
        for group in nets.optimiser.param_groups:
            group["lr"] = lr
        cases = [data.PreparedCase.load(files[i]) for i in rng.choice(train_idx, size=settings.batch_size)]
        coarse_x = torch.stack([torch.from_numpy(c.coarse_image.astype(np.float32))[None] for c in cases])
        coarse_y = torch.stack([torch.from_numpy(c.coarse_label) for c in cases])
        fine = [data.augment(pipeline, *data.random_fine_sample(c, spec.fine_size, settings.train_margin_max_mm, rng))
                for c in cases]
        fine_x = torch.stack([image for image, _ in fine])
        fine_y = torch.stack([label[0] for _, label in fine])
        nets.optimiser.zero_grad(set_to_none=True)
        with autocast(device, settings.amp):
            coarse_loss = dice_ce_loss(nets.coarse(coarse_x.to(device)), coarse_y.to(device))
            fine_loss = dice_ce_loss(nets.fine(fine_x.to(device)), fine_y.to(device))
        nets.scaler.scale(coarse_loss + fine_loss).backward()
        nets.scaler.step(nets.optimiser)
        nets.scaler.update()
        sums += [coarse_loss.item(), fine_loss.item()]
    coarse_mean, fine_mean = sums / settings.iterations_per_epoch
    return {"lr": lr, "loss": coarse_mean + fine_mean, "coarse_loss": coarse_mean, "fine_loss": fine_mean}


@torch.inference_mode()
def validate(nets: Networks, files: Sequence[Path], val_idx: Sequence[int], spec: StudentSpec,
             settings: TrainSettings, device: torch.device) -> dict:
    """Mean hard Dice of each stage on the validation cases, at the network's own resolution, and the fine
    stage's Dice per class (columns ``val_dice_fine_<label id>``: the per-class learning curve).

    The fine stage is scored on the ground-truth box with the inference margin, so the two numbers separate
    localisation (coarse) from delineation (fine).
    """
    nets.coarse.eval()
    nets.fine.eval()
    n_classes = len(spec.class_ids)
    coarse_scores, fine_scores, per_class = [], [], []
    for i in val_idx:
        case = data.PreparedCase.load(files[i])
        coarse_x = torch.from_numpy(case.coarse_image.astype(np.float32))[None, None].to(device)
        with autocast(device, settings.amp):
            coarse_pred = nets.coarse(coarse_x).argmax(1)[0].cpu()
        coarse_scores.append(hard_dice(coarse_pred, torch.from_numpy(case.coarse_label), n_classes))
        margin = [settings.margin_mm] * 3
        image, label = data.fine_sample(case, data.fine_crop_box(case, margin, margin), spec.fine_size)
        with autocast(device, settings.amp):
            fine_pred = nets.fine(image[None].to(device)).argmax(1)[0].cpu()
        scores = class_dice(fine_pred, label[0], n_classes)
        per_class.append(scores)
        fine_scores.append(_nanmean(scores.tolist()))
    row = {"val_dice_coarse": _nanmean(coarse_scores), "val_dice_fine": _nanmean(fine_scores)}
    for index, class_id in enumerate(spec.class_ids[1:]):
        row[f"{CLASS_DICE_PREFIX}{class_id}"] = _nanmean([scores[index] for scores in per_class])
    return row


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN when there are none (no validation case, or nothing to score)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _fingerprint(spec: StudentSpec, settings: TrainSettings, files: Sequence[Path]) -> str:
    """Identity of a training run: a checkpoint is only resumed by the run that wrote it."""
    parts = [asdict(spec), asdict(settings), [f.name for f in files]]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _save_checkpoint(path: Path, nets: Networks, epoch: int, rng: np.random.Generator, rows: list[dict],
                     fingerprint: str) -> None:
    state = {
        "fingerprint": fingerprint,
        "epoch": epoch,
        "coarse": nets.coarse.state_dict(),
        "fine": nets.fine.state_dict(),
        "optimiser": nets.optimiser.state_dict(),
        "scaler": nets.scaler.state_dict(),
        "rng": rng.bit_generator.state,
        "numpy_rng": np.random.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rows": rows,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _restore_checkpoint(path: Path, nets: Networks, rng: np.random.Generator, fingerprint: str
                        ) -> tuple[int, list[dict]] | None:
    """Load a matching checkpoint into ``nets`` and the RNGs; returns (next epoch, log rows) or None."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: holds RNG states
    if state["fingerprint"] != fingerprint:
        print(f"checkpoint {path} belongs to a different run (settings or data changed): starting afresh",
              flush=True)
        return None
    nets.coarse.load_state_dict(state["coarse"])
    nets.fine.load_state_dict(state["fine"])
    nets.optimiser.load_state_dict(state["optimiser"])
    nets.scaler.load_state_dict(state["scaler"])
    rng.bit_generator.state = state["rng"]
    np.random.set_state(state["numpy_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["epoch"] + 1, state["rows"]


def write_log(path: str | os.PathLike, rows: list[dict]) -> None:
    """The per-epoch log: :data:`LOG_COLUMNS`, then one validation Dice column per class."""
    per_class = [key for key in (rows[0] if rows else {}) if key.startswith(CLASS_DICE_PREFIX)]
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=LOG_COLUMNS + per_class).to_csv(tmp, sep="\t", index=False, float_format="%.6g")


def seed_everything(seed: int, device: torch.device) -> None:
    """Seed every RNG training touches (batchgeneratorsv2 draws from numpy's and torch's global ones).

    On CUDA, deterministic kernels are requested too. CPU kernels are already deterministic for a fixed thread
    count, and forcing the flag there disables oneDNN's fast convolution backward (about 2.5x slower).
    """
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def train(cases: Sequence[TrainingCase], spec: StudentSpec, settings: TrainSettings, ignore_label: int | None,
          work_dir: str | os.PathLike, model_out: str | os.PathLike, log_out: str | os.PathLike,
          device: str = "cpu") -> list[dict]:
    """Train both stages, resuming from ``work_dir/latest.pt`` when it belongs to this run; returns the log rows."""
    if not cases:
        raise ValueError("no training cases: the student needs at least one labelled case")
    device = torch.device(device)
    work_dir = Path(work_dir)
    files = prepare_all(cases, spec, settings.train_margin_max_mm, ignore_label, work_dir / "cache")
    train_idx, val_idx = split_cases(cases, settings.val_fraction, settings.seed)
    unlabeled = sum(case.unlabeled for case in cases)
    print(f"{len(train_idx)} training ({unlabeled} of them unlabeled, on pseudo-labels) and {len(val_idx)} "
          f"validation cases", flush=True)
    seed_everything(settings.seed, device)
    rng = np.random.default_rng(settings.seed)
    nets = build_networks(spec, settings, device)
    fingerprint = _fingerprint(spec, settings, files)
    checkpoint = work_dir / "latest.pt"
    start_epoch, rows = _restore_checkpoint(checkpoint, nets, rng, fingerprint) or (0, [])
    if start_epoch:
        print(f"resumed from {checkpoint} after epoch {start_epoch}", flush=True)
    pipeline = data.augmentation_pipeline(spec.fine_size, settings.mirror_axes)
    for epoch in range(start_epoch, settings.epochs):
        started = time.perf_counter()
        row = {"epoch": epoch + 1}
        row.update(train_epoch(nets, files, train_idx, spec, settings, epoch, rng, pipeline, device))
        row.update(validate(nets, files, val_idx, spec, settings, device))
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        print(f"epoch {epoch + 1}/{settings.epochs}  loss {row['loss']:.4f} (coarse {row['coarse_loss']:.4f}, "
              f"fine {row['fine_loss']:.4f})  val Dice coarse {row['val_dice_coarse']:.4f} "
              f"fine {row['val_dice_fine']:.4f}  lr {row['lr']:.2e}  {row['seconds']:.1f}s", flush=True)
        write_log(log_out, rows)
        if (epoch + 1) % settings.checkpoint_every == 0 or epoch + 1 == settings.epochs:
            _save_checkpoint(checkpoint, nets, epoch, rng, rows, fingerprint)
    write_log(log_out, rows)
    save_model(model_out, spec, nets.coarse, nets.fine)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="TSV with columns case, image, label")
    parser.add_argument("--c2f", required=True, help="the student.c2f config section as JSON")
    parser.add_argument("--label-ids", required=True, type=int, nargs="+", help="ids of the label map")
    parser.add_argument("--ignore-label", type=int, default=None, help="label value excluded from the loss")
    parser.add_argument("--work-dir", required=True, help="checkpoints and prepared-case cache (kept for resume)")
    parser.add_argument("--model", required=True, help="output model file")
    parser.add_argument("--log", required=True, help="output per-epoch training log (TSV)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.set_num_threads(args.threads)
    c2f = json.loads(args.c2f)
    try:
        train(read_manifest(args.manifest), StudentSpec.from_config(c2f, args.label_ids),
              TrainSettings.from_config(c2f), args.ignore_label, args.work_dir, args.model, args.log, args.device)
    except CaseError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
