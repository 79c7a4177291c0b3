from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightly_cotap.eval.features import DenseFeatures
from lightly_cotap.eval.linear_probe import (
    LinearSegmentationProbe,
    linear_probe_miou,
    train_linear_probe,
)

NUM_CLASSES = 4


def _label_maps(n: int, seed: int, grid: int = 8) -> torch.Tensor:
    """Patch-level label maps made of 2x2-patch blocks. Shape: (n, grid, grid)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, NUM_CLASSES, (n, grid // 2, grid // 2), generator=g)
    return coarse.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)


def _features(
    patch_labels: torch.Tensor, seed: int, informative: bool, dim: int = 16
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if informative:
        codes = 3.0 * torch.randn(
            NUM_CLASSES, dim, generator=torch.Generator().manual_seed(99)
        )
        feats = codes[patch_labels].permute(0, 3, 1, 2)
    else:
        feats = torch.zeros(*patch_labels.shape, dim).permute(0, 3, 1, 2)
    feats = feats + 0.3 * torch.randn(feats.shape, generator=g)
    return feats.permute(0, 2, 3, 1)


def _dataset(
    n: int, seed: int, informative: bool, label_scale: int = 4
) -> DenseFeatures:
    labels = _label_maps(n, seed)
    masks = labels.repeat_interleave(label_scale, 1).repeat_interleave(label_scale, 2)
    return DenseFeatures(features=_features(labels, seed + 1, informative), masks=masks)


def test_probe_learns_separable_features() -> None:
    train = _dataset(24, seed=0, informative=True)
    val = _dataset(12, seed=10, informative=True)
    result = linear_probe_miou(train, val, NUM_CLASSES, steps=150, progress=False)
    assert result["miou"] > 0.9
    assert result["pixel_accuracy"] > 0.95
    settings = result["settings"]
    assert settings["steps"] == 150
    assert settings["val_label_size"] == [32, 32]
    assert settings["feature_size"] == [8, 8]
    assert settings["select"] == "last"


def test_default_probe_converges_on_small_scale_imbalanced_features() -> None:
    # One-hot class features at a small scale, mostly class 0: exactly separable,
    # but a plain 1x1 conv under Adam needs far more than 100 steps to get there.
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(32, 8, 8, generator=g) < 0.15).long()
    labels *= torch.randint(1, NUM_CLASSES, (32, 8, 8), generator=g)
    feats = 0.05 * F.one_hot(labels, NUM_CLASSES).float()
    data = DenseFeatures(features=feats, masks=labels)
    result = linear_probe_miou(data, data, NUM_CLASSES, steps=100, progress=False)
    assert result["settings"]["head"] == "bn+conv1x1"
    assert result["miou"] > 0.95
    plain = linear_probe_miou(
        data, data, NUM_CLASSES, steps=100, use_bn=False, progress=False
    )
    assert plain["miou"] < 0.6


def test_probe_on_random_features_is_poor() -> None:
    train = _dataset(24, seed=0, informative=False)
    val = _dataset(12, seed=10, informative=False)
    result = linear_probe_miou(train, val, NUM_CLASSES, steps=150, progress=False)
    assert result["miou"] < 0.35


def test_probe_ignores_ignore_index_and_scores_other_label_size() -> None:
    train = _dataset(24, seed=0, informative=True)
    # Corrupt half of the training labels but mark them ignored: still learns.
    masks = train.masks.clone()
    noise = torch.randint(
        0, NUM_CLASSES, masks.shape, generator=torch.Generator().manual_seed(5)
    )
    masks[:, :, :16] = 255
    train_ignored = DenseFeatures(train.features, masks)
    val = _dataset(12, seed=10, informative=True, label_scale=2)  # label size 16
    result = linear_probe_miou(
        train_ignored, val, NUM_CLASSES, steps=150, progress=False
    )
    assert result["miou"] > 0.9
    assert result["settings"]["val_label_size"] == [16, 16]
    # The same corruption *without* ignoring hurts.
    masks_noisy = train.masks.clone()
    masks_noisy[:, :, :16] = noise[:, :, :16]
    noisy = linear_probe_miou(
        DenseFeatures(train.features, masks_noisy),
        val,
        NUM_CLASSES,
        steps=150,
        progress=False,
    )
    assert noisy["miou"] < result["miou"]


def test_probe_is_deterministic_given_seed() -> None:
    train = _dataset(16, seed=0, informative=True)
    a = train_linear_probe(
        train, NUM_CLASSES, steps=5, batch_size=4, seed=3, progress=False
    )
    b = train_linear_probe(
        train, NUM_CLASSES, steps=5, batch_size=4, seed=3, progress=False
    )
    c = train_linear_probe(
        train, NUM_CLASSES, steps=5, batch_size=4, seed=4, progress=False
    )
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_probe_module_shapes_and_upsampling() -> None:
    probe = LinearSegmentationProbe(8, 3, use_bn=True).eval()
    x = torch.randn(2, 8, 5, 7)
    logits = probe(x.permute(0, 2, 3, 1), size=(20, 28))
    assert logits.shape == (2, 3, 20, 28)
    # conv then bilinear upsampling == bilinear upsampling then conv (both linear).
    up = F.interpolate(
        probe.norm(x), size=(20, 28), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(logits, probe.classifier(up), atol=1e-5, rtol=1e-5)
    assert probe(x.permute(0, 2, 3, 1)).shape == (2, 3, 5, 7)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        LinearSegmentationProbe(0, 3)
    with pytest.raises(ValueError, match=r"\(B, h, w, 8\)"):
        LinearSegmentationProbe(8, 3)(torch.randn(2, 4, 4, 7))
    train = _dataset(4, seed=0, informative=True)
    with pytest.raises(ValueError, match="steps"):
        train_linear_probe(train, NUM_CLASSES, steps=0)
    other = DenseFeatures(torch.randn(4, 8, 8, 3), train.masks)
    with pytest.raises(ValueError, match="same channels"):
        linear_probe_miou(train, other, NUM_CLASSES, steps=1, progress=False)
