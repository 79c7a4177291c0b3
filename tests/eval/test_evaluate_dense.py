from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from lightly_cotap.eval import evaluate_dense

NUM_CLASSES = 4
COLORS = torch.tensor(
    [[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]
)


def _scenes(n: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """Images whose colour encodes the class of 8x8 blocks, plus noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        coarse = torch.randint(0, NUM_CLASSES, (4, 4), generator=g)
        mask = coarse.repeat_interleave(8, 0).repeat_interleave(8, 1)  # (32, 32)
        image = COLORS[mask].permute(2, 0, 1) + 0.2 * torch.randn(
            3, 32, 32, generator=g
        )
        out.append((image, mask))
    return out


def _feature_fn(images: Tensor) -> Tensor:
    return F.avg_pool2d(images, 4).permute(0, 2, 3, 1)  # (B, 8, 8, 3)


def test_evaluate_dense_runs_every_evaluation(tmp_path: Path) -> None:
    result = evaluate_dense(
        _feature_fn,
        _scenes(16, 0),
        _scenes(8, 1),
        NUM_CLASSES,
        label_size=32,
        batch_size=5,
        linear_probe={"steps": 200, "lr": 0.03},
        kmeans={"n_init": 2},
        overclustering_k=8,
        visualize_dir=tmp_path / "vis",
        num_visualize=3,
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        progress=False,
    )
    for name in ("linear_probe", "kmeans", "overclustering", "retrieval"):
        assert result[name]["miou"] > 0.8, name
        assert result[name]["seconds"] >= 0
    assert result["kmeans"]["settings"]["num_clusters"] == NUM_CLASSES
    assert result["overclustering"]["settings"]["num_clusters"] == 8
    assert result["overclustering"]["settings"]["matching"] == "greedy"
    assert result["settings"]["feature_shape"] == [8, 8, 3]
    assert result["settings"]["label_size"] == [32, 32]
    for key in ("pca", "similarity"):
        with Image.open(result["visualizations"][key]) as im:
            assert im.size == (2 * 32 + 3 * 2, 3 * 32 + 4 * 2)
    json.dumps(result)  # the report is JSON-serialisable


def test_evaluate_dense_skips_and_defaults() -> None:
    result = evaluate_dense(
        _feature_fn,
        _scenes(6, 0),
        _scenes(4, 1),
        NUM_CLASSES,
        label_size=None,
        linear_probe={"skip": True},
        kmeans={"skip": True},
        retrieval={"k": 5},
        progress=False,
    )
    assert set(result) == {"retrieval", "settings"}
    assert result["retrieval"]["settings"]["k"] == 5
    assert result["settings"]["label_size"] == [32, 32]
    with pytest.raises(ValueError, match="num_classes"):
        evaluate_dense(_feature_fn, _scenes(2, 0), _scenes(2, 1), 1, progress=False)
