from __future__ import annotations

import pytest
import torch
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from torch import nn

from lightly_cotap.models.modules.cossl_heads import (
    CoSSLLocalPredictionHead,
    CoSSLLocalProjectionHead,
)


@pytest.mark.parametrize(
    "local_cls, linear_cls",
    [
        (CoSSLLocalProjectionHead, BYOLProjectionHead),
        (CoSSLLocalPredictionHead, BYOLPredictionHead),
    ],
)
def test_local_head_is_byol_head_at_every_position(
    local_cls: type[nn.Module], linear_cls: type[nn.Module]
) -> None:
    torch.manual_seed(0)
    local_head = local_cls(6, 10, 4)
    linear_head = linear_cls(6, 10, 4)
    linear_head.load_state_dict(local_head.state_dict())
    x = torch.randn(3, 4, 5, 6)  # channel-last (B, H, W, C)
    out = local_head(x)
    assert out.shape == (3, 4, 5, 4)
    # Batch norm statistics over all B * H * W positions, like a Linear head on
    # the flattened positions.
    expected = linear_head(x.reshape(-1, 6))
    torch.testing.assert_close(out.reshape(-1, 4), expected)
    vectors = torch.randn(5, 6)
    torch.testing.assert_close(local_head(vectors), linear_head(vectors))


@pytest.mark.parametrize(
    "local_cls", [CoSSLLocalProjectionHead, CoSSLLocalPredictionHead]
)
def test_local_head_equals_1x1_convolutions_on_channel_first_maps(
    local_cls: type[nn.Module],
) -> None:
    torch.manual_seed(0)
    head = local_cls(6, 10, 4)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    first, last = nn.Conv2d(6, 10, 1, bias=False), nn.Conv2d(10, 4, 1)
    conv = nn.Sequential(first, nn.BatchNorm2d(10), nn.ReLU(), last)
    with torch.no_grad():
        first.weight.copy_(linears[0].weight[:, :, None, None])
        last.weight.copy_(linears[1].weight[:, :, None, None])
        last.bias.copy_(linears[1].bias)  # type: ignore[union-attr]
    x = torch.randn(3, 6, 4, 5)
    torch.testing.assert_close(head(x.permute(0, 2, 3, 1)), conv(x).permute(0, 2, 3, 1))


def test_local_head_defaults_and_bad_inputs() -> None:
    head = CoSSLLocalProjectionHead()
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (2048, 4096),
        (4096, 256),
    ]
    with pytest.raises(ValueError, match="shape"):
        CoSSLLocalPredictionHead(4, 8, 4)(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="positive"):
        CoSSLLocalProjectionHead(0, 8, 4)
