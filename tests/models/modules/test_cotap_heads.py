from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
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


def test_patch_head_forward_dense() -> None:
    head = CoTAPPatchProjectionHead(
        input_dim=12, hidden_dim=16, bottleneck_dim=8, output_dim=6
    )
    feats = torch.randn(2, 12, 3, 4)
    out = head.forward_dense(feats)
    assert out.shape == (2, 6, 3, 4)
    torch.testing.assert_close(out[1, :, 2, 3], head(feats[1, :, 2, 3]))
    with pytest.raises(ValueError, match=r"\(B, 12, H, W\)"):
        head.forward_dense(torch.randn(2, 3, 4, 12))


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
    # Lightly's DINO head uses the deprecated weight_norm (a FutureWarning); the
    # heads build it quietly, and only that warning is silenced.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head_cls(input_dim=24, hidden_dim=32, bottleneck_dim=8, output_dim=10)
