"""Tests of the batched mirroring TTA: the same average as nnU-Net's one-copy-at-a-time loop, the batch sizes it
really uses, the halving on out-of-memory errors, and its use in nnU-Net's final validation of our trainer."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

import tiny_nnunet as tn
from workflow_scripts.nnunet import training
from workflow_scripts.nnunet.ext import configure_environment

configure_environment(None, 1)  # before nnU-Net is imported
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: E402

from workflow_scripts.nnunet.mirroring import BatchedMirroringPredictor, mirrorings  # noqa: E402


class CountingNet(torch.nn.Module):
    """A small non-symmetric 3D network (instance norm: per-sample statistics) that records its batch sizes and
    raises CUDA's out-of-memory error for batches above ``fits``."""

    def __init__(self, fits: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4, affine=True),
                                        torch.nn.LeakyReLU(), torch.nn.Conv3d(4, 3, (3, 1, 3), padding=(1, 0, 1)))
        self.fits = fits
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.fits:
            raise torch.OutOfMemoryError(f"batch {x.shape[0]} does not fit")
        self.batches.append(x.shape[0])
        return self.body(x)


def predictor(cls, net: torch.nn.Module, **kwargs):
    p = cls(use_mirroring=True, device=torch.device("cpu"), allow_tqdm=False, **kwargs)
    p.network, p.allowed_mirroring_axes = net, (0, 1, 2)
    return p


@pytest.fixture(scope="module")
def patch() -> torch.Tensor:
    return torch.randn(1, 1, 6, 8, 10, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(patch) -> torch.Tensor:
    return predictor(nnUNetPredictor, CountingNet())._internal_maybe_mirror_and_predict(patch)


def test_mirrorings_are_nnunets_combinations_in_its_order():
    dims = [2, 3, 4]
    expected = [c for n in range(1, 4) for c in itertools.combinations(dims, n)]
    assert mirrorings((0, 1, 2)) == [(), *expected]
    assert mirrorings((1,)) == [(), (3,)]
    assert mirrorings(None) == mirrorings(()) == [()]


@pytest.mark.parametrize("mirror_batch, batches", [(8, [8]), (3, [3, 3, 2]), (1, [1] * 8)])
def test_same_average_as_nnunet_with_the_batches_asked_for(patch, reference, mirror_batch, batches):
    net = CountingNet()
    result = predictor(BatchedMirroringPredictor, net, mirror_batch=mirror_batch)._internal_maybe_mirror_and_predict(
        patch)
    assert net.batches == batches
    assert result.shape == reference.shape
    torch.testing.assert_close(result, reference, rtol=1e-5, atol=1e-5)


def test_no_mirroring_is_one_plain_forward_pass(patch):
    net = CountingNet()
    p = predictor(BatchedMirroringPredictor, net)
    p.use_mirroring = False
    torch.testing.assert_close(p._internal_maybe_mirror_and_predict(patch), net.body(patch))
    assert net.batches == [1]


def test_out_of_memory_halves_the_batch_and_keeps_the_smaller_size(patch, reference, capsys):
    net = CountingNet(fits=3)
    p = predictor(BatchedMirroringPredictor, net)
    torch.testing.assert_close(p._internal_maybe_mirror_and_predict(patch), reference, rtol=1e-5, atol=1e-5)
    assert p.mirror_batch == 2 and net.batches == [2, 2, 2, 2]
    assert "2 mirrored copies per forward pass" in capsys.readouterr().out
    net.batches.clear()
    p._internal_maybe_mirror_and_predict(patch)
    assert net.batches == [2, 2, 2, 2]  # no second attempt at 4


def test_out_of_memory_at_one_copy_is_raised(patch):
    with pytest.raises(torch.OutOfMemoryError):
        predictor(BatchedMirroringPredictor, CountingNet(fits=0))._internal_maybe_mirror_and_predict(patch)
    with pytest.raises(ValueError, match="at least 1"):
        predictor(BatchedMirroringPredictor, CountingNet(), mirror_batch=0)


def test_final_validation_of_the_trainer_batches_the_mirrorings(tmp_path, monkeypatch):
    prepared = tn.prepare(tmp_path / "data", 982, n_cases=3, epochs=1, iterations=1)
    configure_environment(prepared["root"], 1)
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    from workflow_scripts.nnunet.ext.configurable_trainer import nnUNetTrainerConfigurable

    calls = []
    batched = BatchedMirroringPredictor._internal_maybe_mirror_and_predict
    monkeypatch.setattr(BatchedMirroringPredictor, "_internal_maybe_mirror_and_predict",
                        lambda self, x: calls.append(self.mirror_batch) or batched(self, x))
    trainer = nnUNetTrainerConfigurable({**prepared["plans"], "continue_training": False},
                                        training.custom_configuration(tn.CONFIGURATION), "all", prepared["dataset"],
                                        device=torch.device("cpu"))
    trainer.initialize()
    trainer.output_folder = str(tmp_path / "out")
    trainer.perform_actual_validation()
    assert calls and set(calls) == {8}
    assert trainer_module.nnUNetPredictor is nnUNetPredictor  # restored afterwards
    summary = json.loads(Path(tmp_path / "out" / "validation" / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 3
