"""kNN evaluation of the image-level benchmark on frozen backbone features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from image_level_methods import pooled
from lightly.utils.benchmarking import knn_predict
from torch import Tensor, nn

from lightly_cotap.models.modules import (
    BagOfPatchesAggregator,
    grid_patches,
)


@torch.no_grad()
def embed(
    trunk: nn.Module, images: Tensor, bag_patch_size: int | None = None
) -> Tensor:
    """Normalised features: global pooling, or the BagSSL mean over grid patches."""
    trunk.eval()
    if bag_patch_size is None:
        features = pooled(trunk, images)
    else:
        aggregator = BagOfPatchesAggregator(
            nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1)), chunk_size=512
        )
        patches = grid_patches(images, bag_patch_size, stride=bag_patch_size // 2)
        features = aggregator(patches)
    return F.normalize(features, dim=1)


def knn_accuracy(
    trunk: nn.Module,
    train: Tensor,
    train_labels: Tensor,
    test: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int,
    bag_patch_size: int | None = None,
) -> float:
    bank = embed(trunk, train, bag_patch_size)
    queries = embed(trunk, test, bag_patch_size)
    pred = knn_predict(
        queries, bank.T, train_labels, num_classes=num_classes, knn_k=k, knn_t=0.1
    )
    return float((pred[:, 0] == test_labels).float().mean()) * 100
