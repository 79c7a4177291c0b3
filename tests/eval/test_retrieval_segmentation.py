from __future__ import annotations

import pytest
import torch

from lightly_cotap.eval.features import DenseFeatures
from lightly_cotap.eval.retrieval import (
    build_memory,
    patch_label_histograms,
    retrieval_segmentation,
    retrieve_labels,
)

NUM_CLASSES = 4


def _dataset(n: int, seed: int, informative: bool) -> DenseFeatures:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, NUM_CLASSES, (n, 4, 4), generator=g)
    labels = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)  # (n, 8, 8)
    codes = torch.randn(NUM_CLASSES, 32, generator=torch.Generator().manual_seed(99))
    if informative:
        feats = codes[labels].permute(0, 3, 1, 2)
    else:
        feats = torch.zeros(n, 32, 8, 8)
    feats = feats + 0.3 * torch.randn(feats.shape, generator=g)
    masks = labels.repeat_interleave(4, 1).repeat_interleave(4, 2)
    return DenseFeatures(feats.permute(0, 2, 3, 1), masks)


def test_retrieval_with_label_encoding_features() -> None:
    result = retrieval_segmentation(
        _dataset(12, 0, True), _dataset(6, 1, True), NUM_CLASSES, progress=False
    )
    assert result["miou"] > 0.9
    assert result["settings"]["k"] == 30
    assert result["settings"]["temperature"] == 0.02
    assert result["settings"]["memory_size"] == 12 * 64


def test_retrieval_with_random_features_is_poor() -> None:
    result = retrieval_segmentation(
        _dataset(12, 0, False), _dataset(6, 1, False), NUM_CLASSES, progress=False
    )
    assert result["miou"] < 0.4


def test_patch_label_histograms() -> None:
    mask = torch.tensor(
        [
            [0, 0, 1, 1],
            [0, 1, 1, 1],
            [2, 2, 255, 255],
            [2, 0, 255, 255],
        ]
    )[None]
    hist = patch_label_histograms(mask, 3, (2, 2))
    assert hist.shape == (1, 3, 2, 2)
    torch.testing.assert_close(hist[0, :, 0, 0], torch.tensor([0.75, 0.25, 0.0]))
    torch.testing.assert_close(hist[0, :, 0, 1], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(hist[0, :, 1, 0], torch.tensor([0.25, 0.0, 0.75]))
    torch.testing.assert_close(hist[0, :, 1, 1], torch.zeros(3))  # all ignored


def test_memory_bound_excludes_empty_and_favours_rare_classes() -> None:
    # One image, 4x4 patches: 15 of class 0, one of class 1, and the mask's last
    # row is ignored.
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, 1, 2] = 1
    labels[0, 3] = 255
    masks = labels.repeat_interleave(2, 1).repeat_interleave(2, 2)
    feats = torch.randn(1, 4, 4, 8, generator=torch.Generator().manual_seed(0))
    keys, hist = build_memory(DenseFeatures(feats, masks), 2)
    assert keys.shape == (12, 8) and hist.shape == (12, 2)  # ignored row left out
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(12))
    rare_kept = 0
    for seed in range(5):
        keys, hist = build_memory(
            DenseFeatures(feats, masks), 2, memory_size=3, seed=seed
        )
        assert keys.shape[0] == 3
        rare_kept += int((hist[:, 1] > 0).any())
    assert rare_kept >= 4
    with pytest.raises(ValueError, match="memory_size"):
        build_memory(
            DenseFeatures(feats.repeat(2, 1, 1, 1), masks.repeat(2, 1, 1)),
            2,
            memory_size=1,
        )


def test_retrieve_labels_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    keys = torch.nn.functional.normalize(torch.randn(50, 6, generator=g), dim=1)
    labels = torch.rand(50, 3, generator=g)
    queries = torch.randn(17, 6, generator=g)
    out = retrieve_labels(queries, keys, labels, k=5, temperature=0.1, chunk_size=4)
    q = torch.nn.functional.normalize(queries, dim=1)
    sim = q @ keys.T
    ref = torch.zeros(17, 3)
    for i in range(17):
        order = sim[i].argsort(descending=True)[:5]
        w = torch.softmax(sim[i, order] / 0.1, dim=0)
        ref[i] = (w[:, None] * labels[order]).sum(0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # k larger than the memory is capped.
    assert retrieve_labels(queries, keys[:3], labels[:3], k=30).shape == (17, 3)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="k and temperature"):
        retrieve_labels(torch.randn(2, 3), torch.randn(4, 3), torch.rand(4, 2), k=0)
    with pytest.raises(ValueError, match="chunk_size"):
        retrieve_labels(
            torch.randn(2, 3), torch.randn(4, 3), torch.rand(4, 2), chunk_size=0
        )
    with pytest.raises(ValueError, match="must agree"):
        retrieve_labels(torch.randn(2, 3), torch.randn(4, 5), torch.rand(4, 2))
    train = _dataset(2, 0, True)
    val = DenseFeatures(torch.randn(2, 8, 8, 7), train.masks)
    with pytest.raises(ValueError, match="same channels"):
        retrieval_segmentation(train, val, NUM_CLASSES, progress=False)
    with pytest.raises(ValueError, match="labelled pixel"):
        build_memory(
            DenseFeatures(train.features, torch.full_like(train.masks, 255)), 4
        )
