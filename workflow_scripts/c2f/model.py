"""Networks of the coarse-to-fine student and the self-describing model file.

Both stages use the same efficient encoder-decoder (after EfficientSegNet, Zhang et al. 2021), with fewer channels
for the coarse stage, whose only job is to find the foreground box:

- residual blocks whose 3x3x3 convolution is split into an in-plane 3x3x1 and a through-plane 1x1x3 convolution
  (in (z, y, x) terms kernels (1, 3, 3) then (3, 1, 1)): about a third of the weights and FLOPs of a full 3D
  kernel, and CT is usually far more finely sampled in-plane than along z;
- anisotropic pooling: the first ``inplane_pool_levels`` levels pool only in-plane, so thin structures along z
  survive the early downsampling;
- a light context block at the bottleneck: depthwise dilated branches summed, plus a global channel gate, giving a
  large receptive field for almost no memory;
- a decoder with additive skips (upsample, 1x1x1 projection, add) instead of concatenation, halving decoder
  memory, which is what dominates at 192^3.

Instance normalisation is used because the batch is 2; weights get He initialisation as in the paper.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..io.volumes import atomic_path

NEGATIVE_SLOPE = 0.01


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm3d(channels, affine=True)


class AnisotropicResBlock(nn.Module):
    """Residual block: (1, 3, 3) conv -> norm -> act -> (3, 1, 1) conv -> norm, plus the (projected) input."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.inplane = nn.Conv3d(in_channels, out_channels, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.norm1 = _norm(out_channels)
        self.through = nn.Conv3d(out_channels, out_channels, (3, 1, 1), padding=(1, 0, 0), bias=False)
        self.norm2 = _norm(out_channels)
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, bias=False), _norm(out_channels))
        )
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One operation per statement and in-place additions, so at most three full-size tensors are alive at
        # once: at 192^3 each is over 200 MB, and this is what keeps fine-stage inference within 2 GB.
        y = self.inplane(x)
        y = self.act(self.norm1(y))
        y = self.through(y)
        y = self.norm2(y)
        y += self.skip(x)
        return self.act(y)


class ContextBlock(nn.Module):
    """Multi-scale context at the bottleneck for little cost.

    Depthwise dilated 3x3x3 branches (one per dilation) are summed and mixed by one pointwise convolution; a global
    average-pooled gate then rescales channels. The gate is applied after normalisation because instance norm
    would otherwise remove any per-channel scaling.
    """

    def __init__(self, channels: int, dilations: Sequence[int] = (1, 2, 4)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv3d(channels, channels, 3, padding=d, dilation=d, groups=channels, bias=False) for d in dilations
        )
        self.mix = nn.Conv3d(channels, channels, 1, bias=False)
        self.norm = _norm(channels)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Conv3d(channels, channels, 1), nn.Sigmoid())
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.norm(self.mix(sum(branch(x) for branch in self.branches)))
        return self.act(x + context * self.gate(x))


class EfficientSegNet(nn.Module):
    """Encoder-decoder with anisotropic residual blocks, a context bottleneck and additive skips.

    ``channels`` gives the width of each level (its length is the number of levels). Any input size works: pooling
    rounds up and each decoder level is upsampled to its skip's exact shape.
    """

    def __init__(self, channels: Sequence[int], n_classes: int, inplane_pool_levels: int = 1) -> None:
        super().__init__()
        channels = list(channels)
        self.encoders = nn.ModuleList(
            AnisotropicResBlock(c_in, c_out) for c_in, c_out in zip([1] + channels[:-1], channels)
        )
        self.pools = nn.ModuleList(
            nn.MaxPool3d((1, 2, 2) if level < inplane_pool_levels else 2, ceil_mode=True)
            for level in range(len(channels) - 1)
        )
        self.context = ContextBlock(channels[-1])
        self.projections = nn.ModuleList(
            nn.Conv3d(c_deep, c_skip, 1, bias=False) for c_deep, c_skip in zip(channels[1:], channels[:-1])
        )
        self.decoders = nn.ModuleList(AnisotropicResBlock(c, c) for c in channels[:-1])
        self.head = nn.Conv3d(channels[0], n_classes, 1)
        self.apply(_he_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = self.pools[level - 1](x)
            x = encoder(x)
            skips.append(x)
        x = self.context(skips.pop())
        for level in reversed(range(len(self.decoders))):
            skip = skips.pop()  # popped so each skip is freed as soon as it has been added
            x = F.interpolate(self.projections[level](x), size=skip.shape[2:], mode="trilinear", align_corners=False)
            x += skip
            del skip
            x = self.decoders[level](x)
        return self.head(x)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision (fp16 / bf16) on CUDA; a no-op on CPU, where autocast would only slow small networks."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


def _he_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv3d):
        nn.init.kaiming_normal_(module.weight, a=NEGATIVE_SLOPE, nonlinearity="leaky_relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@dataclass(frozen=True)
class StudentSpec:
    """Everything needed to rebuild and feed the two networks; stored inside the model file."""

    class_ids: tuple[int, ...]  # label id of each output channel; index 0 is background (id 0)
    window: tuple[float, float]
    coarse_size: tuple[int, int, int]
    fine_size: tuple[int, int, int]
    coarse_channels: tuple[int, ...]
    fine_channels: tuple[int, ...]
    inplane_pool_levels: int

    @classmethod
    def from_config(cls, c2f: dict, label_ids: Sequence[int]) -> "StudentSpec":
        """The spec for the ``student.c2f`` config section and the label map's ids."""
        if not c2f["window"][0] < c2f["window"][1]:
            raise ValueError(f"student.c2f.window must be [low, high] with low < high, got {c2f['window']}")
        return cls(
            class_ids=tuple([0] + sorted(int(i) for i in label_ids)),
            window=tuple(float(v) for v in c2f["window"]),
            coarse_size=tuple(int(v) for v in c2f["coarse_size"]),
            fine_size=tuple(int(v) for v in c2f["fine_size"]),
            coarse_channels=tuple(int(v) for v in c2f["coarse_channels"]),
            fine_channels=tuple(int(v) for v in c2f["channels"]),
            inplane_pool_levels=int(c2f["inplane_pool_levels"]),
        )

    def build(self) -> tuple[EfficientSegNet, EfficientSegNet]:
        """Freshly initialised (coarse, fine) networks."""
        n = len(self.class_ids)
        return (
            EfficientSegNet(self.coarse_channels, n, self.inplane_pool_levels),
            EfficientSegNet(self.fine_channels, n, self.inplane_pool_levels),
        )


def save_model(path: str | os.PathLike, spec: StudentSpec, coarse: nn.Module, fine: nn.Module) -> None:
    """Atomically write the spec and both networks' weights (CPU tensors, loadable anywhere)."""
    payload = {
        "spec": asdict(spec),
        "coarse": {k: v.detach().cpu() for k, v in coarse.state_dict().items()},
        "fine": {k: v.detach().cpu() for k, v in fine.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: str | os.PathLike, device: str | torch.device) -> tuple[StudentSpec, EfficientSegNet,
                                                                               EfficientSegNet]:
    """Rebuild both networks from a model file, on ``device`` and in eval mode."""
    return networks_from_payload(torch.load(path, map_location="cpu", weights_only=True), device)


def networks_from_payload(payload: dict, device: str | torch.device) -> tuple[StudentSpec, EfficientSegNet,
                                                                             EfficientSegNet]:
    """Both networks from a loaded model file (:func:`save_model`'s, or an export of it that adds keys)."""
    spec = StudentSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in payload["spec"].items()})
    coarse, fine = spec.build()
    coarse.load_state_dict(payload["coarse"])
    fine.load_state_dict(payload["fine"])
    return spec, coarse.to(device).eval(), fine.to(device).eval()
