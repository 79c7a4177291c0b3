from __future__ import annotations

import pytest
import torch
from torch import nn

from lightly_cotap.models.modules.bag_of_patches import (
    BagOfPatchesAggregator,
    aggregate_patch_embeddings,
    grid_patches,
)


def test_grid_patches_matches_slicing() -> None:
    images = torch.randn(2, 3, 10, 13)
    patches = grid_patches(images, patch_size=4, stride=3)
    rows, cols = (10 - 4) // 3 + 1, (13 - 4) // 3 + 1
    assert patches.shape == (2, rows * cols, 3, 4, 4)
    index = 0
    for r in range(rows):
        for c in range(cols):
            expected = images[:, :, 3 * r : 3 * r + 4, 3 * c : 3 * c + 4]
            assert torch.equal(patches[:, index], expected)
            index += 1
    assert grid_patches(images, patch_size=5).shape == (2, 4, 3, 5, 5)


def test_aggregator_mean_of_backbone_embeddings_and_chunking() -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(1))
    patches = torch.randn(3, 4, 3, 8, 8)
    expected = torch.stack(
        [
            torch.stack([backbone(patches[b, j : j + 1]).flatten() for j in range(4)])
            for b in range(3)
        ]
    )  # (B, n, D)
    aggregator = BagOfPatchesAggregator(backbone, chunk_size=5)
    torch.testing.assert_close(aggregator.embed_patches(patches), expected)
    torch.testing.assert_close(aggregator(patches), expected.mean(dim=1))
    torch.testing.assert_close(
        BagOfPatchesAggregator(backbone)(list(patches.unbind(1))),
        expected.mean(dim=1),
    )
    torch.testing.assert_close(aggregate_patch_embeddings(expected), expected.mean(1))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="embeddings"):
        aggregate_patch_embeddings(torch.randn(3, 0, 4))
    with pytest.raises(ValueError, match="images"):
        grid_patches(torch.randn(3, 8, 8), patch_size=4)
    with pytest.raises(ValueError, match="does not fit"):
        grid_patches(torch.randn(1, 3, 8, 8), patch_size=9)
    with pytest.raises(ValueError, match="positive"):
        grid_patches(torch.randn(1, 3, 8, 8), patch_size=4, stride=0)
    with pytest.raises(ValueError, match="chunk_size"):
        BagOfPatchesAggregator(nn.Identity(), chunk_size=0)
    with pytest.raises(ValueError, match="patches"):
        BagOfPatchesAggregator(nn.Identity())(torch.randn(2, 3, 8, 8))
