from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import update_momentum
from torch import nn

from lightly_cotap.models.modules import (
    CoTAPClsProjectionHead,
    CoTAPPatchProjectionHead,
)

HEADS = [CoTAPPatchProjectionHead, CoTAPClsProjectionHead]


@pytest.mark.parametrize("head_cls", HEADS)
def test_default_dims(head_cls: type[nn.Module]) -> None:
    head: Any = head_cls()
    linears = [m for m in head.layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (768, 2048),
        (2048, 2048),
        (2048, 256),
    ]
    expected_k = 512 if head_cls is CoTAPPatchProjectionHead else 4096
    assert head.last_layer.weight.shape == (expected_k, 256)


@pytest.mark.parametrize("head_cls", HEADS)
def test_architecture(head_cls: type[nn.Module]) -> None:
    head: Any = head_cls(input_dim=24, hidden_dim=32, bottleneck_dim=8, output_dim=10)
    assert not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in head.modules()
    )
    assert sum(isinstance(m, nn.GELU) for m in head.modules()) == 2
    linears = [m for m in head.layers if isinstance(m, nn.Linear)]
    assert linears[-1].bias is None  # bottleneck without bias (official Projector)
    assert linears[0].bias is not None
    assert head.last_layer.bias is None
    # Weight normalised prototypes with the norm (weight_g) fixed to 1.
    norm = head.last_layer.parametrizations.weight.original0
    assert not norm.requires_grad
    torch.testing.assert_close(norm, torch.ones_like(norm))
    torch.testing.assert_close(
        head.last_layer.weight.norm(dim=1), torch.ones(10), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("head_cls", HEADS)
def test_outputs_are_cosine_scores(head_cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    head: Any = head_cls(input_dim=24, hidden_dim=32, bottleneck_dim=8, output_dim=10)
    direction = head.last_layer.parametrizations.weight.original1
    direction.data.normal_()
    x = torch.randn(5, 24)
    out = head(x)
    assert out.shape == (5, 10)
    z = F.normalize(head.layers(x), dim=-1)
    w = F.normalize(direction, dim=-1)
    torch.testing.assert_close(out, z @ w.T)
    assert out.abs().max() <= 1.0 + 1e-6


def test_patch_head_applies_to_channel_last_maps() -> None:
    head = CoTAPPatchProjectionHead(
        input_dim=12, hidden_dim=16, bottleneck_dim=8, output_dim=6
    )
    feats = torch.randn(2, 3, 4, 12)  # (B, H, W, D)
    out = head(feats)
    assert out.shape == (2, 3, 4, 6)
    torch.testing.assert_close(out[1, 2, 3], head(feats[1, 2, 3]))
    with pytest.raises(RuntimeError):
        head(torch.randn(2, 12, 3, 4))  # channel-first maps are rejected


@pytest.mark.parametrize("head_cls", HEADS)
def test_head_is_lightlys_dino_head_with_a_bias_free_bottleneck(
    head_cls: type[nn.Module],
) -> None:
    torch.manual_seed(0)
    head: Any = head_cls(input_dim=12, hidden_dim=16, bottleneck_dim=8, output_dim=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Lightly's weight_norm
        dino = DINOProjectionHead(12, 16, 8, 6, batch_norm=False, norm_last_layer=True)
    direction = head.last_layer.parametrizations.weight.original1
    direction.data.normal_()
    with torch.no_grad():
        for mine, theirs in zip(head.layers, dino.layers):
            if isinstance(mine, nn.Linear):
                theirs.weight.copy_(mine.weight)
                theirs.bias.copy_(0.0 if mine.bias is None else mine.bias)
        dino.last_layer.weight_v.copy_(direction)
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(head(x), dino(x))
    # Lightly's initialisation: truncated normal (std 0.02) weights, zero biases.
    weights = torch.cat([m.weight.detach().flatten() for m in head.layers[::2]])
    assert weights.abs().max() <= 2.0 and 0.015 < float(weights.std()) < 0.025
    assert not head.layers[0].bias.any() and not head.layers[2].bias.any()


@pytest.mark.parametrize("head_cls", HEADS)
def test_gradients_deepcopy_and_ema(head_cls: type[nn.Module]) -> None:
    head: Any = head_cls(input_dim=12, hidden_dim=16, bottleneck_dim=8, output_dim=6)
    x = torch.randn(4, 12)
    head(x).square().sum().backward()
    for name, p in head.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
    assert head.last_layer.parametrizations.weight.original0.grad is None
    # An EMA teacher head by deepcopy (also after a forward pass).
    teacher = copy.deepcopy(head)
    torch.testing.assert_close(teacher(x), head(x))
    for p in head.parameters():
        p.data.add_(1.0)
    update_momentum(head, teacher, m=0.0)
    torch.testing.assert_close(teacher(x), head(x))


@pytest.mark.parametrize("head_cls", HEADS)
def test_invalid_dims(head_cls: type[nn.Module]) -> None:
    with pytest.raises(ValueError, match="output_dim"):
        head_cls(input_dim=12, output_dim=0)
    with pytest.raises(ValueError, match="input_dim"):
        head_cls(input_dim=-1)


@pytest.mark.parametrize("head_cls", HEADS)
def test_building_a_head_emits_no_warning(head_cls: type[nn.Module]) -> None:
    # The heads use torch's weight_norm parametrization, not the deprecated
    # torch.nn.utils.weight_norm of Lightly's DINO head: no warning at all.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head_cls(input_dim=24, hidden_dim=32, bottleneck_dim=8, output_dim=10)
