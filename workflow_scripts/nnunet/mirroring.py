"""nnU-Net's mirroring test-time augmentation with the mirrored copies of a patch in one batch.

nnU-Net (``nnUNetPredictor._internal_maybe_mirror_and_predict``) runs the network once per mirroring: 8 forward
passes with batch size 1 for every patch of a 3D sliding window. Stacking the copies into one batch gives the same
average (instance normalisation is per sample; only float rounding differs) at a fraction of the cost, because a
single-sample forward pass of a patch leaves most of a CPU or GPU idle: measured 3.8x per patch on 2 CPU cores for
the demo teacher (385 -> 100 ms).

The batch holds ``mirror_batch`` copies (all 8 by default, config ``pseudo.tta_batch``). On CUDA an out-of-memory
error halves it and retries the patch, and the smaller size is kept for the rest of the run, so a big model on a
small GPU still predicts. The workflow's predictions (:mod:`workflow_scripts.nnunet.predict`) and nnU-Net's final
validation in training (``nnUNetTrainerConfigurable.perform_actual_validation``) use it.

nnU-Net reads its environment when its modules are imported: import this module after
:func:`workflow_scripts.nnunet.ext.configure_environment`.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.helpers import empty_cache

from .ext import ALL_MIRRORINGS_3D


def mirrorings(axes: Sequence[int] | None) -> list[tuple[int, ...]]:
    """Tensor dimensions flipped by each copy: the original first, then nnU-Net's combinations in its order."""
    if not axes:
        return [()]
    dims = [axis + 2 for axis in axes]  # data axes -> dimensions of a (batch, channel, *spatial) tensor
    return [(), *(c for n in range(1, len(dims) + 1) for c in itertools.combinations(dims, n))]


class BatchedMirroringPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` that passes the mirrored copies of each patch through the network together."""

    def __init__(self, *args, mirror_batch: int = ALL_MIRRORINGS_3D, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if mirror_batch < 1:
            raise ValueError(f"mirror_batch must be at least 1, got {mirror_batch}")
        self.mirror_batch = mirror_batch

    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        axes = self.allowed_mirroring_axes if self.use_mirroring else None
        if axes and max(axes) > x.ndim - 3:
            raise ValueError(f"mirror axes {axes} do not fit an input of {x.ndim} dimensions")
        flips = mirrorings(axes)
        while True:
            try:
                return self._mean_over_mirrorings(x, flips)
            except torch.OutOfMemoryError:
                if self.mirror_batch == 1:
                    raise
                self.mirror_batch //= 2
                empty_cache(self.device)
                print(f"out of memory: {self.mirror_batch} mirrored copies per forward pass from now on", flush=True)

    def _mean_over_mirrorings(self, x: torch.Tensor, flips: list[tuple[int, ...]]) -> torch.Tensor:
        total, n = None, x.shape[0]
        for start in range(0, len(flips), self.mirror_batch):
            group = flips[start:start + self.mirror_batch]
            batch = torch.cat([torch.flip(x, dims) if dims else x for dims in group])
            out = self.network(batch)
            for k, dims in enumerate(group):
                copy = torch.flip(out[k * n:(k + 1) * n], dims) if dims else out[k * n:(k + 1) * n]
                total = copy.clone() if total is None else total.add_(copy)
            del batch, out
        return total.div_(len(flips))
