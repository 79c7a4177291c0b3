from __future__ import annotations

import pytest
import torch
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from torch import nn

from lightly_cotap.models.modules.cossl_heads import (
    CoSSLLocalPredictionHead,
    CoSSLLocalProjectionHead,
)


def _copy_linear_head_into_conv_head(
    linear_head: nn.Module, conv_head: nn.Module
) -> None:
    linears = [m for m in linear_head.modules() if isinstance(m, nn.Linear)]
    convs = [m for m in conv_head.modules() if isinstance(m, nn.Conv2d)]
    assert len(linears) == len(convs) == 2
    for linear, conv in zip(linears, convs):
        conv.weight.data.copy_(linear.weight.data[:, :, None, None])
        if linear.bias is not None:
            assert conv.bias is not None
            conv.bias.data.copy_(linear.bias.data)
        else:
            assert conv.bias is None


@pytest.mark.parametrize(
    "conv_cls, linear_cls",
    [
        (CoSSLLocalProjectionHead, BYOLProjectionHead),
        (CoSSLLocalPredictionHead, BYOLPredictionHead),
    ],
)
def test_local_head_is_byol_head_at_every_position(
    conv_cls: type[nn.Module], linear_cls: type[nn.Module]
) -> None:
    torch.manual_seed(0)
    conv_head = conv_cls(6, 10, 4)
    linear_head = linear_cls(6, 10, 4)
    _copy_linear_head_into_conv_head(linear_head, conv_head)
    x = torch.randn(3, 6, 4, 5)
    out = conv_head(x)
    assert out.shape == (3, 4, 4, 5)
    # Batch norm statistics over all B * H * W positions, like a Linear head on
    # the flattened positions.
    expected = linear_head(x.permute(0, 2, 3, 1).reshape(-1, 6))
    torch.testing.assert_close(out.permute(0, 2, 3, 1).reshape(-1, 4), expected)
    vectors = torch.randn(5, 6)
    torch.testing.assert_close(conv_head(vectors), linear_head(vectors))


def test_local_head_defaults_and_bad_inputs() -> None:
    head = CoSSLLocalProjectionHead()
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (2048, 4096),
        (4096, 256),
    ]
    with pytest.raises(ValueError, match="shape"):
        CoSSLLocalPredictionHead(4, 8, 4)(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="positive"):
        CoSSLLocalProjectionHead(0, 8, 4)
