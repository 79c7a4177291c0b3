from __future__ import annotations

from typing import Any

import pytest
import timm
import torch
from torch import Tensor, nn

from lightly_cotap.eval.features import (
    DenseFeatures,
    extract_dense_features,
    resize_masks,
)


def _tiny_vit() -> Any:
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        depth=1,
        num_classes=0,
        drop_rate=0.5,
    )


def _vit_dense(vit: Any, x: Tensor) -> Tensor:
    tokens: Tensor = vit.forward_features(x)[:, vit.num_prefix_tokens :]
    b, n, c = tokens.shape
    side = int(n**0.5)
    return tokens.reshape(b, side, side, c)


def _dataset(n: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(3, 32, 32, generator=g),
            torch.randint(0, 3, (32, 32), generator=g),
        )
        for _ in range(n)
    ]


def test_extract_with_tiny_vit() -> None:
    vit = _tiny_vit()
    vit.train()
    data = _dataset(5)
    cache = extract_dense_features(
        lambda x: _vit_dense(vit, x),
        data,
        label_size=16,
        batch_size=2,
        module=vit,
        progress=False,
    )
    assert cache.features.shape == (5, 2, 2, 192)
    assert cache.masks.shape == (5, 16, 16) and cache.masks.dtype == torch.int64
    assert cache.label_size == (16, 16)
    assert not cache.features.requires_grad
    assert vit.training  # mode restored
    vit.eval()
    with torch.no_grad():
        ref = _vit_dense(vit, torch.stack([d[0] for d in data]))
    torch.testing.assert_close(cache.features, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.masks[0], resize_masks(data[0][1][None], 16)[0])


class _ModeRecorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []
        self.grad_enabled: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.modes.append(self.training)
        self.grad_enabled.append(torch.is_grad_enabled())
        return x[:, :2, ::4, ::4]


def test_module_feature_fn_runs_in_eval_mode_without_grad() -> None:
    rec = _ModeRecorder()
    cache = extract_dense_features(
        rec, _dataset(3), label_size=None, batch_size=2, progress=False
    )
    assert rec.modes == [False, False] and rec.grad_enabled == [False, False]
    assert rec.training
    assert cache.masks.shape == (3, 32, 32)
    half = extract_dense_features(
        rec, _dataset(3), batch_size=3, feature_dtype=torch.float16, progress=False
    )
    assert half.features.dtype == torch.float16
    assert half.masks.shape == (3, 100, 100)  # default label size of Leopart / NeCo


def test_resize_masks_nearest() -> None:
    mask = torch.tensor([[[0, 1], [2, 255]]])
    up = resize_masks(mask, 4)
    expected = torch.tensor(
        [[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]]]
    )
    assert torch.equal(up, expected)
    assert torch.equal(resize_masks(up, (2, 2)), mask)


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        extract_dense_features(lambda x: x, _dataset(2), batch_size=0, progress=False)
    with pytest.raises(ValueError, match="empty"):
        extract_dense_features(lambda x: x, [], progress=False)
    with pytest.raises(ValueError, match=r"\(B, h, w, D\)"):
        extract_dense_features(lambda x: x.mean(dim=1), _dataset(2), progress=False)
    with pytest.raises(ValueError, match="masks"):
        DenseFeatures(torch.randn(2, 3, 4, 4), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="features"):
        DenseFeatures(torch.randn(2, 3, 4), torch.zeros(2, 8, 8))
