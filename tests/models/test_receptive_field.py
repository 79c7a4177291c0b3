from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lightly_cotap.models.receptive_field import (
    cap_receptive_field,
    resnet_receptive_field,
)


def _empirical_receptive_field(trunk: nn.Module, size: int) -> int:
    """Width of the input region with non-zero gradient for the centre output unit."""
    trunk.eval()
    x = torch.randn(1, 3, size, size, dtype=torch.float64, requires_grad=True)
    out = trunk(x)
    h, w = out.shape[-2:]
    out[0, :, h // 2, w // 2].sum().backward()
    assert x.grad is not None
    cols = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 2)) > 0).flatten()
    return int(cols.max() - cols.min() + 1)


def test_resnet18_receptive_field_formula() -> None:
    # Stem 7 + max pool 4 -> 11; layer1 +32 -> 43; layer2 +56 -> 99; layer3 +112
    # -> 211; layer4 +224 -> 435.
    assert resnet_receptive_field(torchvision.models.resnet18()) == 435


@pytest.mark.parametrize("cap, expected", [(29, 27), (99, 99)])
def test_cap_resnet18_matches_gradient_support(cap: int, expected: int) -> None:
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    rf = cap_receptive_field(resnet, cap)
    assert rf == expected == resnet_receptive_field(resnet)
    trunk = nn.Sequential(*list(resnet.children())[:-2]).double()
    # Input large enough that the centre unit's window is not clipped by the border.
    assert _empirical_receptive_field(trunk, size=160) == rf
    # Shapes are unchanged by the 1 x 1 substitutions.
    assert trunk(torch.randn(2, 3, 64, 64, dtype=torch.float64)).shape == (2, 512, 2, 2)


def test_cap_bottleneck_resnet() -> None:
    resnet = torchvision.models.resnet50()
    assert cap_receptive_field(resnet, 99) <= 99
    kernels = [
        m.kernel_size for m in resnet.layer4.modules() if isinstance(m, nn.Conv2d)
    ]
    assert all(k == (1, 1) for k in kernels)


def test_cap_below_stem_raises() -> None:
    with pytest.raises(ValueError, match="stem"):
        cap_receptive_field(torchvision.models.resnet18(), 9)
