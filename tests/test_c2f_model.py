"""Coarse-to-fine networks: shapes for anisotropic inputs, the efficient building blocks, the model file."""
from __future__ import annotations

import pytest
import torch

from workflow_scripts.c2f.model import (AnisotropicResBlock, ContextBlock, EfficientSegNet, StudentSpec, autocast,
                                        load_model, save_model)

C2F = {"window": [-325, 325], "coarse_size": [8, 16, 16], "fine_size": [12, 24, 20], "coarse_channels": [4, 8],
       "channels": [4, 8, 16], "inplane_pool_levels": 1}


@pytest.mark.parametrize("shape", [(1, 1, 16, 24, 24), (2, 1, 7, 33, 18), (1, 1, 3, 40, 40)])
def test_output_keeps_the_input_grid_for_any_anisotropic_size(shape) -> None:
    net = EfficientSegNet([4, 8, 16], n_classes=5, inplane_pool_levels=1).eval()
    with torch.inference_mode():
        out = net(torch.randn(shape))
    assert out.shape == (shape[0], 5, *shape[2:])
    assert torch.isfinite(out).all()


def test_pooling_is_in_plane_only_at_the_first_levels() -> None:
    net = EfficientSegNet([4, 8, 16, 32], n_classes=3, inplane_pool_levels=2)
    assert [pool.kernel_size for pool in net.pools] == [(1, 2, 2), (1, 2, 2), 2]
    with torch.inference_mode():
        # z=4 survives three poolings only because the first two leave z alone
        assert net.eval()(torch.randn(1, 1, 4, 32, 32)).shape == (1, 3, 4, 32, 32)


def test_residual_block_splits_the_3d_kernel_into_in_plane_and_through_plane_parts() -> None:
    block = AnisotropicResBlock(4, 8)
    assert block.inplane.kernel_size == (1, 3, 3) and block.through.kernel_size == (3, 1, 1)
    full_kernel_weights = 4 * 8 * 27 + 8 * 8 * 27
    assert block.inplane.weight.numel() + block.through.weight.numel() < full_kernel_weights / 2


def test_context_block_preserves_shape_and_sees_far_context() -> None:
    block = ContextBlock(4).eval()
    x = torch.zeros(1, 4, 9, 9, 9)
    with torch.inference_mode():
        base = block(x)
        x[0, :, 0, 0, 0] = 5.0  # a corner voxel changes the far corner's output (dilations + global gate)
        assert block(x).shape == base.shape
        assert not torch.allclose(block(x)[0, :, 8, 8, 8], base[0, :, 8, 8, 8])


def test_weights_get_he_initialisation() -> None:
    torch.manual_seed(0)
    net = EfficientSegNet([32, 64], n_classes=3)
    conv = net.encoders[1].inplane  # 32 -> 64 channels, 1x3x3 kernel: fan_in 288
    expected = (2 / (1 + 0.01 ** 2) / 288) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.1)


def test_spec_from_config_orders_classes_and_rejects_an_empty_window() -> None:
    spec = StudentSpec.from_config(C2F, [14, 1, 2])
    assert spec.class_ids == (0, 1, 2, 14)
    with pytest.raises(ValueError, match="window"):
        StudentSpec.from_config({**C2F, "window": [100, -100]}, [1])


def test_model_file_round_trip_gives_identical_predictions(tmp_path) -> None:
    spec = StudentSpec.from_config(C2F, [1, 2, 3])
    coarse, fine = spec.build()
    path = tmp_path / "model.pt"
    save_model(path, spec, coarse, fine)
    loaded_spec, loaded_coarse, loaded_fine = load_model(path, "cpu")
    assert loaded_spec == spec
    x = torch.randn(1, 1, *spec.fine_size)
    with torch.inference_mode():
        assert torch.equal(fine.eval()(x), loaded_fine(x))
        assert torch.equal(coarse.eval()(x), loaded_coarse(x))
    assert not loaded_fine.training


def test_autocast_is_a_no_op_on_cpu() -> None:
    with autocast(torch.device("cpu"), "fp16"):
        y = torch.nn.Linear(2, 2)(torch.ones(1, 2))
    assert y.dtype == torch.float32
