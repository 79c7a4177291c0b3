from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightly_cotap.eval.clustering import (
    assign_clusters,
    fit_kmeans,
    fit_standardize_pca,
    kmeans_segmentation,
)
from lightly_cotap.eval.features import DenseFeatures

NUM_CLASSES = 4


def _clustered(seed: int, informative: bool = True, n: int = 10) -> DenseFeatures:
    """Features whose patches lie in tight, well separated class clusters."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, NUM_CLASSES, (n, 4, 4), generator=g)
    labels = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)  # (n, 8, 8)
    centers = 10.0 * torch.randn(NUM_CLASSES, 24, generator=g)
    if informative:
        feats = centers[labels].permute(0, 3, 1, 2)
    else:
        feats = torch.zeros(n, 24, 8, 8)
    feats = feats + 0.5 * torch.randn(feats.shape, generator=g)
    masks = labels.repeat_interleave(4, 1).repeat_interleave(4, 2)  # (n, 32, 32)
    return DenseFeatures(feats.permute(0, 2, 3, 1), masks)


def test_kmeans_recovers_clusters_up_to_permutation() -> None:
    val = _clustered(0)
    result = kmeans_segmentation(val, NUM_CLASSES, n_init=2, progress=False)
    assert result["miou"] > 0.9
    assert result["pixel_accuracy"] > 0.95
    assert sorted(result["mapping"]) == list(range(NUM_CLASSES))  # one-to-one
    assert result["settings"]["matching"] == "hungarian"
    assert result["settings"]["num_clusters"] == NUM_CLASSES


def test_overclustering_uses_greedy_matching() -> None:
    val = _clustered(1)
    result = kmeans_segmentation(
        val, NUM_CLASSES, num_clusters=3 * NUM_CLASSES, n_init=2, progress=False
    )
    assert result["settings"]["matching"] == "greedy"
    assert len(result["mapping"]) == 3 * NUM_CLASSES
    assert result["miou"] > 0.9


def test_kmeans_on_uninformative_features_is_poor() -> None:
    val = _clustered(2, informative=False)
    result = kmeans_segmentation(val, NUM_CLASSES, n_init=2, progress=False)
    assert result["miou"] < 0.4


def test_assignment_equals_nearest_centroid_of_upsampled_features() -> None:
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(3, 6, 4, 5, generator=g)
    x = feats.permute(0, 2, 3, 1).reshape(-1, 6)
    weight, bias = fit_standardize_pca(x, pca_dim=3)
    centroids = torch.randn(5, 3, generator=g, dtype=torch.float64)
    labels = assign_clusters(
        feats.permute(0, 2, 3, 1), weight, bias, centroids, (16, 20), batch_size=2
    )
    # Reference: upsample the features first, map every pixel, nearest centroid.
    up = F.interpolate(feats, size=(16, 20), mode="bilinear", align_corners=False)
    z = up.permute(0, 2, 3, 1).double() @ weight + bias
    ref = torch.cdist(z.reshape(-1, 3), centroids).argmin(dim=1).reshape(3, 16, 20)
    assert (labels == ref).float().mean() > 0.999  # float32 ties at most


def test_standardize_pca_decorrelates() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2000, 5, generator=g) @ torch.randn(5, 5, generator=g) + 3.0
    weight, bias = fit_standardize_pca(x, pca_dim=3)
    z = x.double() @ weight + bias
    assert weight.shape == (5, 3)
    torch.testing.assert_close(
        z.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-8, rtol=0
    )
    cov = torch.cov(z.T)
    off = cov - torch.diag(cov.diagonal())
    assert off.abs().max() < 1e-8
    assert cov.diagonal()[0] >= cov.diagonal()[1] >= cov.diagonal()[2]
    # Without PCA it only standardises.
    w_full, b_full = fit_standardize_pca(x, pca_dim=None)
    z_full = x.double() @ w_full + b_full
    torch.testing.assert_close(
        z_full.std(0), torch.ones(5, dtype=torch.float64), atol=1e-4, rtol=0
    )


def test_invalid_arguments() -> None:
    val = _clustered(5, n=2)
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans_segmentation(val, NUM_CLASSES, num_clusters=0, progress=False)
    with pytest.raises(ValueError, match="matching"):
        kmeans_segmentation(val, NUM_CLASSES, matching="best", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_clusters"):
        fit_kmeans(torch.randn(3, 2), 4)
    with pytest.raises(ValueError, match="pca_dim"):
        fit_standardize_pca(torch.randn(5, 3), pca_dim=0)
