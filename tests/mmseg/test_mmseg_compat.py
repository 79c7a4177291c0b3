from __future__ import annotations

import importlib.machinery
import sys

import pytest
import torch
from torch import Tensor

pytest.importorskip("mmseg")

from lightly_cotap.mmseg import compat  # noqa: E402


def test_mmseg_models_import() -> None:
    import mmseg.models  # noqa: F401
    from mmcv.ops import (  # noqa: F401
        CrissCrossAttention,
        PSAMask,
        SigmoidFocalLoss,
        point_sample,
        sigmoid_focal_loss,
    )

    assert compat.has_compiled_ops() is False
    assert compat.is_patched()
    assert compat.apply() is True  # idempotent


def test_full_mmcv_is_not_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend a compiled mmcv._ext is installed: apply() must patch nothing.
    before = sys.modules[compat.EXT_MODULE_NAME]
    monkeypatch.setattr(compat, "is_patched", lambda: False)
    monkeypatch.setattr(
        compat.importlib.util,
        "find_spec",
        lambda name: importlib.machinery.ModuleSpec(name, loader=None),
    )
    assert compat.has_compiled_ops() is True
    assert compat.apply() is False
    assert sys.modules[compat.EXT_MODULE_NAME] is before


def test_op_without_stand_in_fails_when_used_not_at_import() -> None:
    from mmcv.ops import nms  # import works

    with pytest.raises(compat.MissingCompiledOpError, match="nms.*mim install"):
        nms(torch.rand(3, 4), torch.rand(3), 0.5)


def _bilinear_zero_pad(image: Tensor, x: float, y: float) -> Tensor:
    """Bilinear sample at pixel coordinates (x, y), zero outside. image (C, H, W)."""
    c, h, w = image.shape
    x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
    out = torch.zeros(c, dtype=image.dtype)
    for yy, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
        for xx, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * image[:, yy, xx]
    return out


@pytest.mark.parametrize("align_corners", [False, True])
def test_point_sample_matches_bilinear_reference(align_corners: bool) -> None:
    from mmcv.ops import point_sample

    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 5, 7, generator=gen, dtype=torch.float64)
    points = torch.rand(2, 6, 2, generator=gen, dtype=torch.float64) * 1.2 - 0.1
    out = point_sample(features, points, align_corners=align_corners)
    assert out.shape == (2, 3, 6)
    h, w = features.shape[-2:]
    for b in range(2):
        for n in range(6):
            px, py = float(points[b, n, 0]), float(points[b, n, 1])
            if align_corners:
                x, y = px * (w - 1), py * (h - 1)
            else:
                x, y = px * w - 0.5, py * h - 0.5
            expected = _bilinear_zero_pad(features[b], x, y)
            torch.testing.assert_close(out[b, :, n], expected)


def _focal_reference(
    logits: Tensor, target: Tensor, gamma: float, alpha: float, weight: Tensor | None
) -> Tensor:
    """Element-wise sigmoid focal loss written from its definition. (N, C)."""
    p = torch.sigmoid(logits)
    classes = torch.arange(logits.shape[1])
    onehot = (target.unsqueeze(1) == classes).to(logits.dtype)
    pos = -alpha * (1 - p) ** gamma * torch.log(p)
    neg = -(1 - alpha) * p**gamma * torch.log(1 - p)
    loss = onehot * pos + (1 - onehot) * neg
    if weight is not None:
        loss = loss * weight[target].unsqueeze(1)
    return loss


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("with_weight", [False, True])
def test_sigmoid_focal_loss_values_and_gradients(
    reduction: str, with_weight: bool
) -> None:
    from mmcv.ops import sigmoid_focal_loss

    gen = torch.Generator().manual_seed(1)
    logits = (
        torch.randn(6, 4, generator=gen, dtype=torch.float64) * 3
    ).requires_grad_()
    target = torch.tensor([0, 1, 2, 3, 1, 0])
    weight = torch.rand(4, generator=gen, dtype=torch.float64) if with_weight else None
    out = sigmoid_focal_loss(logits, target, 2.0, 0.25, weight, reduction)

    ref_logits = logits.detach().clone().requires_grad_()
    ref = _focal_reference(ref_logits, target, 2.0, 0.25, weight)
    ref = {"none": ref, "mean": ref.sum() / 6, "sum": ref.sum()}[reduction]
    torch.testing.assert_close(out, ref)

    grad_out = torch.randn_like(ref)
    (out * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    assert logits.grad is not None and ref_logits.grad is not None
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_sigmoid_focal_loss_ignored_target_is_all_negative() -> None:
    from mmcv.ops import sigmoid_focal_loss

    logits = torch.randn(2, 3, dtype=torch.float64)
    out = sigmoid_focal_loss(logits, torch.tensor([255, 1]), 2.0, 0.25, None, "none")
    ref = _focal_reference(logits, torch.tensor([255, 1]), 2.0, 0.25, None)
    torch.testing.assert_close(out, ref)


def _psamask_reference(x: Tensor, psa_type: str, mask: tuple[int, int]) -> Tensor:
    """Literal transcription of mmcv's CPU kernel loops."""
    n, _, h, w = x.shape
    hm, wm = mask
    half_h, half_w = (hm - 1) // 2, (wm - 1) // 2
    out = x.new_zeros(n, h * w, h, w)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                for hi in range(max(0, half_h - i), min(hm, h + half_h - i)):
                    for wi in range(max(0, half_w - j), min(wm, w + half_w - j)):
                        value = x[b, hi * wm + wi, i, j]
                        pos = (hi + i - half_h) * w + (wi + j - half_w)
                        if psa_type == "collect":
                            out[b, pos, i, j] = value
                        else:
                            out[b, i * w + j, pos // w, pos % w] = value
    return out


@pytest.mark.parametrize("psa_type", ["collect", "distribute"])
@pytest.mark.parametrize("mask", [(3, 5), (7, 9)])
def test_psamask_values_and_gradients(psa_type: str, mask: tuple[int, int]) -> None:
    from mmcv.ops import PSAMask

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, mask[0] * mask[1], 4, 5, generator=gen, dtype=torch.float64)
    x.requires_grad_()
    out = PSAMask(psa_type, mask)(x)
    x_ref = x.detach().clone().requires_grad_()
    ref = _psamask_reference(x_ref, psa_type, mask)
    torch.testing.assert_close(out, ref)
    grad_out = torch.randn_like(ref)
    (out * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    assert x.grad is not None and x_ref.grad is not None
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_criss_cross_attention_runs() -> None:
    from mmcv.ops import CrissCrossAttention

    layer = CrissCrossAttention(16)
    x = torch.randn(1, 16, 5, 6, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert out.shape == x.shape and x.grad is not None
