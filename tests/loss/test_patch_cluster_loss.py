from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightly_cotap.loss.patch_cluster_loss import PatchClusterLoss

# Hand-made geometry on a 16 x 16 px image where every crop intersection maps to
# whole feature cells, so RoI-align with output_size=2 reduces to block means:
#   crop 0 (global) (0, 0, 12, 12), 6 x 6 grid (2 px / cell)
#   crop 1 (global) (4, 4, 16, 16), 6 x 6 grid
#   crop 2 (local)  (4, 4, 8, 8),   2 x 2 grid
#   crop 3 (local)  (8, 0, 12, 4),  2 x 2 grid   (does not overlap crop 1)
BOXES = torch.tensor(
    [[0, 0, 12, 12], [4, 4, 16, 16], [4, 4, 8, 8], [8, 0, 12, 4]], dtype=torch.float32
)
GRIDS = [6, 6, 2, 2]


def _grid_box(inter: list[float], crop: list[float], grid: int) -> list[int]:
    scale = grid / (crop[2] - crop[0])
    out = [
        (inter[0] - crop[0]) * scale,
        (inter[1] - crop[1]) * scale,
        (inter[2] - crop[0]) * scale,
        (inter[3] - crop[1]) * scale,
    ]
    assert all(float(v).is_integer() for v in out)
    return [int(v) for v in out]


def _blocks(feature: Tensor, box: list[int], out: int) -> Tensor:
    """(h, w, K) map -> (out * out, K) block means over the grid box (row-major)."""
    x0, y0, x1, y1 = box
    bh, bw = (y1 - y0) // out, (x1 - x0) // out
    cells = []
    for i in range(out):
        for j in range(out):
            ys, xs = y0 + i * bh, x0 + j * bw
            cells.append(feature[ys : ys + bh, xs : xs + bw].mean(dim=(0, 1)))
    return torch.stack(cells)


def _reference(
    codes: Tensor,
    student_global: Tensor,
    student_local: Tensor,
    fg_mask: Tensor,
    temperature: float,
    threshold: float,
) -> Tensor:
    batch, g = codes.shape[:2]
    crops = g + student_local.shape[1]
    total = torch.zeros((), dtype=torch.float64)
    boxes = BOXES.tolist()
    for c in range(g):
        for v in range(crops):
            if v == c:
                continue
            a, b = boxes[c], boxes[v]
            inter = [max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])]
            if inter[2] <= inter[0] or inter[3] <= inter[1]:
                continue  # no overlap: pair skipped
            box_c = _grid_box(inter, a, GRIDS[c])
            box_v = _grid_box(inter, b, GRIDS[v])
            ce_sum = torch.zeros((), dtype=torch.float64)
            count = 0
            for n in range(batch):
                student = student_global[n, v] if v < g else student_local[n, v - g]
                q = _blocks(codes[n, c], box_c, 2)
                keep = (
                    _blocks(fg_mask[n, c][..., None].double(), box_c, 2)[:, 0]
                    >= threshold
                )
                logits = _blocks(student, box_v, 2) / temperature
                log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
                for cell in range(4):
                    if keep[cell]:
                        ce_sum = ce_sum - (q[cell] * log_p[cell]).sum()
                        count += 1
            total = total + ce_sum / max(count, 1)
    return total / (g * (crops - 1))


def _inputs(seed: int, batch: int = 2, k: int = 5) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.softmax(
        torch.randn(batch, 2, 6, 6, k, generator=gen, dtype=torch.float64), dim=-1
    )
    student_global = torch.randn(
        batch, 2, 6, 6, k, generator=gen, dtype=torch.float64
    ).requires_grad_()
    student_local = torch.randn(
        batch, 2, 2, 2, k, generator=gen, dtype=torch.float64
    ).requires_grad_()
    fg_mask = torch.rand(batch, 2, 6, 6, generator=gen) > 0.25
    return dict(
        teacher_codes=codes,
        student_global=student_global,
        student_local=student_local,
        fg_mask=fg_mask,
        crop_boxes=BOXES.expand(batch, -1, -1).clone(),
    )


@pytest.mark.parametrize("seed, threshold", [(0, 1.0), (1, 1.0), (2, 0.5)])
def test_matches_reference_values_and_gradients(seed: int, threshold: float) -> None:
    inputs = _inputs(seed)
    loss_fn = PatchClusterLoss(temperature=0.1, output_size=2, fg_threshold=threshold)
    loss = loss_fn(**inputs)
    wrt = [inputs["student_global"], inputs["student_local"]]
    grads = torch.autograd.grad(loss, wrt)
    expected = _reference(
        inputs["teacher_codes"],
        inputs["student_global"],
        inputs["student_local"],
        inputs["fg_mask"],
        0.1,
        threshold,
    )
    expected_grads = torch.autograd.grad(expected, wrt)
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, expected, rtol=1e-10)
    for got, want in zip(grads, expected_grads):
        assert got.abs().sum() > 0
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-12)


def test_horizontal_flip_is_undone() -> None:
    inputs = _inputs(3)
    loss_fn = PatchClusterLoss(output_size=2)
    plain = loss_fn(**inputs)
    # Flip local crop 2 (pixels and features mirrored) and tell the loss.
    flipped_local = inputs["student_local"].detach().clone()
    flipped_local[:, 0] = flipped_local[:, 0].flip(-2)  # the W axis of (B, h, w, K)
    flipped = torch.zeros(2, 4, dtype=torch.bool)
    flipped[:, 2] = True
    out = loss_fn(**dict(inputs, student_local=flipped_local, flipped=flipped))
    assert torch.allclose(out, plain.detach(), rtol=1e-10)
    # Without the flag the (mirrored) features are misaligned: a different loss.
    wrong = loss_fn(**dict(inputs, student_local=flipped_local))
    assert not torch.allclose(wrong, plain.detach())


def test_mask_comes_from_the_teacher_crop() -> None:
    """Masking out crop 0's foreground must change only pairs that use crop 0 as
    the teacher crop; the loss then equals the reference with that mask.
    """
    inputs = _inputs(4)
    mask = inputs["fg_mask"].clone()
    mask[:, 0] = False
    loss = PatchClusterLoss(output_size=2)(**dict(inputs, fg_mask=mask))
    expected = _reference(
        inputs["teacher_codes"],
        inputs["student_global"],
        inputs["student_local"],
        mask,
        0.1,
        1.0,
    )
    assert torch.allclose(loss, expected, rtol=1e-10)


def test_without_mask_and_without_locals() -> None:
    inputs = _inputs(5)
    loss_fn = PatchClusterLoss(output_size=2)
    all_fg = torch.ones_like(inputs["fg_mask"])
    with_mask = loss_fn(**dict(inputs, fg_mask=all_fg))
    without = loss_fn(**dict(inputs, fg_mask=None))
    assert torch.allclose(with_mask, without)
    globals_only = loss_fn(
        teacher_codes=inputs["teacher_codes"],
        student_global=inputs["student_global"],
        crop_boxes=inputs["crop_boxes"][:, :2],
    )
    assert torch.isfinite(globals_only)


def test_empty_foreground_gives_zero_with_graph() -> None:
    inputs = _inputs(6)
    loss = PatchClusterLoss(output_size=2)(
        **dict(inputs, fg_mask=torch.zeros_like(inputs["fg_mask"]))
    )
    assert loss.item() == 0.0
    loss.backward()
    assert inputs["student_global"].grad is not None


def test_float32_under_autocast() -> None:
    inputs = _inputs(7)
    inputs = {
        k: v.detach().float() if v.is_floating_point() else v for k, v in inputs.items()
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = PatchClusterLoss(output_size=2)(**inputs)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(output_size=0), "output_size"),
        (dict(fg_threshold=1.5), "fg_threshold"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PatchClusterLoss(**kwargs)


def test_bad_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = _inputs(8)
    loss_fn = PatchClusterLoss(output_size=2)
    cases = [
        ("teacher_codes", inputs["teacher_codes"][:, :1]),
        ("student_global", inputs["student_global"][:, 0]),
        ("student_local", inputs["student_local"][:1]),
        ("crop_boxes", inputs["crop_boxes"][:, :3]),
        ("fg_mask", inputs["fg_mask"].transpose(2, 3)[..., :3]),
    ]
    for name, bad in cases:
        with pytest.raises(ValueError, match=name):
            loss_fn(**dict(inputs, **{name: bad}))
    with pytest.raises(ValueError, match="flipped"):
        loss_fn(**inputs, flipped=torch.zeros(2, 3, dtype=torch.bool))
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="gather_distributed"):
        PatchClusterLoss(gather_distributed=True)
