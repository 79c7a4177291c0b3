from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

from lightly_cotap.loss import ContinuousAPLoss, cotap_loss, value_checks
from lightly_cotap.loss.cotap_loss import (
    CoTAPLoss,
    draw_negative_images,
    gather_cells,
    pair_similarities,
    pool_cells,
    select_foreground_cells,
)

# ----------------------------------------------------------------------------------
# Reference implementation written from the formula (float64, explicit loops).
# ----------------------------------------------------------------------------------


def _phi(x: Tensor, tau: float) -> Tensor:
    if x < 0:
        return 1 - 2 * x / tau
    if x < tau:
        return (1 - x / tau) ** 2
    return x * 0


def _reference_ap(
    scores: list[Tensor], targets: list[float], weights: list[float], tau: float
) -> Tensor:
    n = len(scores)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        neg = torch.zeros((), dtype=torch.float64)
        pos = 0
        for j in range(n):
            gap = max(targets[i] - targets[j], 0.0)
            if gap > 0:
                neg = neg + gap * _phi(scores[i] - scores[j], tau)
            if targets[j] >= targets[i] and float(scores[j].detach()) >= float(
                scores[i].detach()
            ):
                pos += 1
        u = neg / pos
        total = total + weights[i] * u / (1 + u)
    return total / sum(weights)


def _cell(features: Tensor, b: int, v: int, p: int, i: int, j: int) -> Tensor:
    """Mean of the (i, j) cell of a p x p pooling of crop v of image b (h % p == 0)."""
    h, w = features.shape[-2:]
    sh, sw = h // p, w // p
    block = features[b, v, ..., i * sh : (i + 1) * sh, j * sw : (j + 1) * sw]
    return block.reshape(*block.shape[:-2], -1).mean(-1)


def _reference_selection(
    mask: Tensor, b: int, p: int, k: int
) -> list[tuple[int, int, int]]:
    """Cells (v, i, j) of image b with the k largest pooled foreground fractions."""
    v_count = mask.shape[1]
    scored = []
    for v, i, j in itertools.product(range(v_count), range(p), range(p)):
        scored.append((float(_cell(mask.double(), b, v, p, i, j)), (v, i, j)))
    scored.sort(key=lambda x: -x[0])
    return [c for _, c in scored[:k]]


def _cos(a: Tensor, b: Tensor) -> Tensor:
    cos: Tensor = (a * b).sum() / (a.norm() * b.norm())
    return cos


def _reference_loss(
    *,
    student_x: Tensor,
    student_pos: Tensor,
    teacher_x: Tensor,
    teacher_pos: Tensor,
    fg_mask_x: Tensor,
    fg_mask_pos: Tensor,
    pool_sizes: tuple[int, ...],
    top_k: int,
    negative_weight: float = 0.1,
    tau: float = 0.5,
    weight_offset: float = -0.2,
) -> Tensor:
    """CoTAP loss with every other image of the batch as negative (R = B - 1)."""
    batch = student_x.shape[0]
    losses = []
    for p in pool_sizes:
        scores: list[Tensor] = []
        targets: list[float] = []
        weights: list[float] = []
        sel_x = [_reference_selection(fg_mask_x, b, p, top_k) for b in range(batch)]
        sel_pos = [_reference_selection(fg_mask_pos, b, p, top_k) for b in range(batch)]
        for b, c in itertools.product(range(batch), range(batch)):
            factor = 1.0 if b == c else negative_weight
            for cx in sel_x[b]:
                for cp in sel_pos[c]:
                    s = _cos(
                        _cell(student_x, b, *cx[:1], p, *cx[1:]),
                        _cell(student_pos, c, cp[0], p, cp[1], cp[2]),
                    )
                    t = float(
                        _cos(
                            _cell(teacher_x, b, cx[0], p, cx[1], cx[2]),
                            _cell(teacher_pos, c, cp[0], p, cp[1], cp[2]),
                        )
                    )
                    scores.append(s)
                    targets.append(t)
                    weights.append(max(t - weight_offset, 0.0) * factor)
        losses.append(_reference_ap(scores, targets, weights, tau))
    return torch.stack(losses).mean()


def _random_batch(
    batch: int = 3, crops: int = 2, dim: int = 5, size: int = 4, seed: int = 0
) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def feats() -> Tensor:
        return torch.randn(
            batch, crops, dim, size, size, generator=gen, dtype=torch.float64
        )

    teacher_x, teacher_pos = feats(), feats()
    # Student = teacher + noise so that targets and scores are correlated.
    student_x = (teacher_x + 0.7 * feats()).requires_grad_()
    student_pos = (teacher_pos + 0.7 * feats()).requires_grad_()
    # Continuous masks: distinct pooled values, no ties in the selection.
    fg_x = torch.rand(batch, crops, size, size, generator=gen, dtype=torch.float64)
    fg_pos = torch.rand(batch, crops, size, size, generator=gen, dtype=torch.float64)
    return dict(
        student_x=student_x,
        student_pos=student_pos,
        teacher_x=teacher_x,
        teacher_pos=teacher_pos,
        fg_mask_x=fg_x,
        fg_mask_pos=fg_pos,
    )


# ----------------------------------------------------------------------------------
# Whole loss against the reference.
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_cotap_loss_matches_reference_values_and_gradients(seed: int) -> None:
    inputs = _random_batch(seed=seed)
    loss_fn = CoTAPLoss(pool_sizes=(2, 4), top_k=3, num_negatives=2)
    loss = loss_fn(**inputs)
    grads = torch.autograd.grad(loss, [inputs["student_x"], inputs["student_pos"]])

    expected = _reference_loss(
        student_x=inputs["student_x"],
        student_pos=inputs["student_pos"],
        teacher_x=inputs["teacher_x"],
        teacher_pos=inputs["teacher_pos"],
        fg_mask_x=inputs["fg_mask_x"],
        fg_mask_pos=inputs["fg_mask_pos"],
        pool_sizes=(2, 4),
        top_k=3,
    )
    expected_grads = torch.autograd.grad(
        expected, [inputs["student_x"], inputs["student_pos"]]
    )
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, expected, rtol=1e-10, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        assert g.abs().sum() > 0
        assert torch.allclose(g, e, rtol=1e-8, atol=1e-12)


def test_cotap_loss_result_independent_of_negative_draw_when_all_used() -> None:
    inputs = _random_batch(batch=4, seed=3)
    loss_fn = CoTAPLoss(pool_sizes=(2,), top_k=2, num_negatives=10)  # clamped to 3
    torch.manual_seed(0)
    a = loss_fn(**inputs)
    torch.manual_seed(1)
    b = loss_fn(**inputs)
    assert torch.allclose(a, b, rtol=1e-12)


def test_cotap_loss_changes_with_fewer_negatives() -> None:
    inputs = _random_batch(batch=4, seed=4)
    full = CoTAPLoss(pool_sizes=(2,), top_k=2, num_negatives=3)(**inputs)
    fewer = CoTAPLoss(pool_sizes=(2,), top_k=2, num_negatives=1)(**inputs)
    assert not torch.allclose(full, fewer)


# ----------------------------------------------------------------------------------
# Cell selection: a hand-constructed batch that would catch a mask/feature mismatch.
# ----------------------------------------------------------------------------------


def _placed_foreground(
    batch: int, crops: int, size: int
) -> tuple[Tensor, dict[int, set[int]]]:
    """Each image has its foreground in ONE crop, at a place unique to the image.

    Image b: crop (b % crops), a 2 x 2 block whose top-left corner is at
    (2 * (b // 2), 2 * (b % 2)) on a size x size grid. Returns the mask and, per
    image, the expected cell indices at pool size ``size`` (4 cells).
    """
    mask = torch.zeros(batch, crops, size, size, dtype=torch.bool)
    expected: dict[int, set[int]] = {}
    for b in range(batch):
        v = b % crops
        r0, c0 = 2 * ((b // 2) % (size // 2)), 2 * (b % 2)
        mask[b, v, r0 : r0 + 2, c0 : c0 + 2] = True
        expected[b] = {
            v * size * size + r * size + c
            for r in range(r0, r0 + 2)
            for c in range(c0, c0 + 2)
        }
    return mask, expected


def test_select_foreground_cells_finds_each_images_own_foreground() -> None:
    batch, crops, size = 5, 2, 4
    mask, expected = _placed_foreground(batch, crops, size)
    for tie_break in (True, False):
        index = select_foreground_cells(
            mask, pool_size=size, top_k=4, random_tie_break=tie_break
        )
        assert index.shape == (batch, 4)
        for b in range(batch):
            assert set(index[b].tolist()) == expected[b]
    # At pool size 2 the foreground block is exactly one cell: crop v, cell (r0/2, c0/2).
    index = select_foreground_cells(mask, pool_size=2, top_k=1)
    for b in range(batch):
        v = b % crops
        r, c = (b // 2) % 2, b % 2
        assert index[b].tolist() == [v * 4 + r * 2 + c]


def test_selected_features_come_from_the_same_image_and_crop_as_the_mask() -> None:
    """Features carry their own (image, crop, row, col) identity; the cells picked by
    the mask must be the ones at the mask's foreground, and the positive pairs of image
    b must pair x's foreground cells with x+'s foreground cells of the same b.
    """
    batch, crops, size = 4, 2, 4
    mask_x, expected_x = _placed_foreground(batch, crops, size)
    # x+ foreground: the same construction shifted by one image (distinct places).
    mask_pos = torch.roll(mask_x, shifts=1, dims=0)
    expected_pos = {b: expected_x[(b - 1) % batch] for b in range(batch)}
    # Feature channel 0..3 encode (b, v, r, c); positive so cos is well defined.
    grid = torch.stack(
        torch.meshgrid(
            torch.arange(batch),
            torch.arange(crops),
            torch.arange(size),
            torch.arange(size),
            indexing="ij",
        ),
        dim=2,
    ).double()  # (B, V, 4, h, w)
    cells = pool_cells(grid, size)  # (B, V*h*w, 4)
    for mask, expected in ((mask_x, expected_x), (mask_pos, expected_pos)):
        index = select_foreground_cells(mask, pool_size=size, top_k=4)
        picked = gather_cells(cells, index)  # (B, 4, 4)
        for b in range(batch):
            got = {tuple(int(x) for x in row) for row in picked[b]}
            want = set()
            for cell in expected[b]:
                v, rest = divmod(cell, size * size)
                r, c = divmod(rest, size)
                want.add((b, v, r, c))
                assert bool(mask[b, v, r, c])
            assert got == want


def test_pool_cells_order_is_crop_row_column() -> None:
    features = torch.arange(2 * 3 * 1 * 4 * 4, dtype=torch.float64).reshape(
        2, 3, 1, 4, 4
    )
    cells = pool_cells(features, 2)
    assert cells.shape == (2, 12, 1)
    for b, v, i, j in itertools.product(range(2), range(3), range(2), range(2)):
        block = features[b, v, 0, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean()
        assert cells[b, v * 4 + i * 2 + j, 0] == block


# ----------------------------------------------------------------------------------
# Pair builder on a hand-constructed batch.
# ----------------------------------------------------------------------------------


def test_pair_similarities_hand_constructed() -> None:
    # 3 images, 2 cells each, features are basis vectors of R^6: anchor cell i of image
    # b is e_{2b+i}; positive cell j of image c is e_{2c+j} for j=0 and
    # (e_{2c} + e_{2c+1}) for j=1.
    eye = torch.eye(6, dtype=torch.float64)
    anchors = torch.stack([eye[2 * b : 2 * b + 2] for b in range(3)])
    positives = torch.stack(
        [torch.stack([eye[2 * c], eye[2 * c] + eye[2 * c + 1]]) for c in range(3)]
    )
    negative_index = torch.tensor([[1, 2], [2, 0], [0, 1]])
    sim, is_pos = pair_similarities(
        anchors=anchors, positives=positives, negative_index=negative_index
    )
    assert sim.shape == (3, 3, 2, 2)
    r = 2**-0.5
    own = torch.tensor([[1.0, r], [0.0, r]], dtype=torch.float64)
    for b in range(3):
        assert torch.allclose(sim[b, 0], own)  # own x+: same basis vectors
        assert torch.allclose(sim[b, 1:], torch.zeros(2, 2, 2, dtype=torch.float64))
    assert is_pos[:, 0].all() and not is_pos[:, 1:].any()
    # Same-image "negatives" would be detected: use image b itself as negative.
    sim_self, _ = pair_similarities(
        anchors=anchors,
        positives=positives,
        negative_index=torch.tensor([[0], [1], [2]]),
    )
    assert torch.allclose(sim_self[:, 1], sim_self[:, 0])


def test_draw_negative_images_is_a_balanced_derangement() -> None:
    torch.manual_seed(0)
    for batch, num in ((2, 1), (6, 5), (7, 3), (1, 0)):
        neg = draw_negative_images(batch_size=batch, num_negatives=num)
        assert neg.shape == (batch, num)
        for b in range(batch):
            assert b not in neg[b].tolist()
            assert len(set(neg[b].tolist())) == num
        counts = torch.bincount(neg.flatten(), minlength=batch)
        assert (counts == num).all()
    with pytest.raises(ValueError, match="num_negatives"):
        draw_negative_images(batch_size=3, num_negatives=3)


def test_draw_negative_images_is_random() -> None:
    torch.manual_seed(0)
    draws = {
        tuple(draw_negative_images(batch_size=6, num_negatives=1).flatten().tolist())
        for _ in range(20)
    }
    assert len(draws) > 1


# ----------------------------------------------------------------------------------
# Edge cases and errors.
# ----------------------------------------------------------------------------------


def test_cotap_loss_single_image_and_empty_foreground() -> None:
    inputs = _random_batch(batch=1, seed=5)
    inputs["fg_mask_x"] = torch.zeros_like(inputs["fg_mask_x"], dtype=torch.bool)
    loss = CoTAPLoss(pool_sizes=(2, 4), top_k=2)(**inputs)
    assert torch.isfinite(loss)
    loss.backward()
    assert inputs["student_x"].grad is not None


def test_cotap_loss_zero_weights_keep_graph() -> None:
    inputs = _random_batch(batch=2, seed=6)
    # Teacher targets all -1 (anti-parallel x and x+ cells) -> weights (t + 0.2)_+ = 0.
    inputs["teacher_pos"] = -inputs["teacher_x"]
    inputs["fg_mask_pos"] = inputs["fg_mask_x"]
    loss = CoTAPLoss(pool_sizes=(4,), top_k=1, num_negatives=0)(**inputs)
    assert loss.item() == 0.0
    loss.backward()
    assert inputs["student_x"].grad is not None


def test_cotap_loss_float32_and_bool_masks() -> None:
    inputs = _random_batch(batch=3, seed=7)
    inputs = {k: v.detach().float() for k, v in inputs.items()}
    inputs["student_x"].requires_grad_()
    inputs["fg_mask_x"] = inputs["fg_mask_x"] > 0.5
    inputs["fg_mask_pos"] = inputs["fg_mask_pos"] > 0.5
    loss = CoTAPLoss(pool_sizes=(2, 4))(**inputs)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pool_sizes=()), "pool_sizes"),
        (dict(pool_sizes=(0, 7)), "pool_sizes"),
        (dict(top_k=0), "top_k"),
        (dict(num_negatives=-1), "num_negatives"),
        (dict(negative_weight=-0.5), "negative_weight"),
        (dict(tau=0.0), "tau"),
    ],
)
def test_cotap_loss_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CoTAPLoss(**kwargs)


def test_cotap_loss_gather_distributed_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="gather_distributed"):
        CoTAPLoss(gather_distributed=True)


def test_cotap_loss_bad_shapes() -> None:
    inputs = _random_batch(batch=3, seed=8)
    loss_fn = CoTAPLoss(pool_sizes=(2, 4))
    bad = dict(inputs, student_x=inputs["student_x"][:, 0])
    with pytest.raises(ValueError, match="student_x"):
        loss_fn(**bad)
    bad = dict(inputs, teacher_pos=inputs["teacher_pos"][:1])
    with pytest.raises(ValueError, match="teacher_pos"):
        loss_fn(**bad)
    # Mask with crop and image axes swapped (the official-code ordering bug).
    bad = dict(inputs, fg_mask_x=inputs["fg_mask_x"].transpose(0, 1))
    with pytest.raises(ValueError, match="fg_mask_x"):
        loss_fn(**bad)
    with pytest.raises(ValueError, match="pool_sizes"):
        CoTAPLoss(pool_sizes=(7,))(**inputs)


def test_cotap_loss_non_finite_features() -> None:
    inputs = _random_batch(batch=2, seed=9)
    bad = inputs["student_x"].detach().clone()
    bad[0, 0, 0] = float("nan")
    loss_fn = CoTAPLoss(pool_sizes=(4,), top_k=16)
    with value_checks(), pytest.raises(ValueError, match="non-finite"):
        loss_fn(**dict(inputs, student_x=bad))
    # Without the (host-synchronising) checks the NaN propagates.
    assert torch.isnan(loss_fn(**dict(inputs, student_x=bad)))


def test_cotap_loss_non_finite_mask_with_value_checks() -> None:
    inputs = _random_batch(batch=2, seed=9)
    mask = inputs["fg_mask_x"].float()
    mask[0, 0, 0, 0] = float("inf")
    with value_checks(), pytest.raises(ValueError, match="fg_mask_x contains non"):
        CoTAPLoss(pool_sizes=(4,))(**dict(inputs, fg_mask_x=mask))


def test_module_exports() -> None:
    assert cotap_loss.CoTAPLoss is CoTAPLoss


# ----------------------------------------------------------------------------------
# Exchangeable criterion.
# ----------------------------------------------------------------------------------


class _RecordingCriterion(nn.Module):
    """Records the keyword arguments of every call; returns the mean score."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Tensor | None]] = []

    def forward(
        self,
        *,
        scores: Tensor,
        targets: Tensor,
        weights: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        self.calls.append(
            dict(scores=scores, targets=targets, weights=weights, mask=mask)
        )
        return scores.mean()


def test_criterion_receives_one_flat_list_per_pool_size() -> None:
    inputs = _random_batch(batch=4, crops=2, seed=10)
    recorder = _RecordingCriterion()
    loss_fn = CoTAPLoss(pool_sizes=(2, 4), top_k=3, num_negatives=2, criterion=recorder)
    torch.manual_seed(0)
    loss = loss_fn(**inputs)
    assert len(recorder.calls) == 2
    # Replay the same draws to rebuild the pairs of pool size 2.
    torch.manual_seed(0)
    index_x = select_foreground_cells(inputs["fg_mask_x"], pool_size=2, top_k=3)
    index_pos = select_foreground_cells(inputs["fg_mask_pos"], pool_size=2, top_k=3)
    negatives = draw_negative_images(batch_size=4, num_negatives=2)
    cells = [
        gather_cells(pool_cells(inputs[name], 2), index)
        for name, index in (
            ("student_x", index_x),
            ("student_pos", index_pos),
            ("teacher_x", index_x),
            ("teacher_pos", index_pos),
        )
    ]
    scores, is_positive = pair_similarities(
        anchors=cells[0], positives=cells[1], negative_index=negatives
    )
    targets, _ = pair_similarities(
        anchors=cells[2], positives=cells[3], negative_index=negatives
    )
    weights = (targets + 0.2).clamp_min(0) * torch.where(is_positive, 1.0, 0.1)
    call = recorder.calls[0]
    n = 4 * 3 * 3 * (1 + 2)
    for name, expected in (
        ("scores", scores),
        ("targets", targets),
        ("weights", weights),
    ):
        value = call[name]
        assert value is not None and value.shape == (n,)
        torch.testing.assert_close(value, expected.flatten())
    assert call["mask"] is None
    assert call["scores"] is not None and call["scores"].requires_grad
    assert call["targets"] is not None and not call["targets"].requires_grad
    torch.testing.assert_close(
        loss,
        torch.stack([c["scores"].mean() for c in recorder.calls]).mean(),  # type: ignore[union-attr]
    )


def test_default_criterion_is_continuous_ap_loss() -> None:
    inputs = _random_batch(seed=11)
    default = CoTAPLoss(pool_sizes=(2, 4), top_k=3, num_negatives=2, tau=0.3)
    given = CoTAPLoss(
        pool_sizes=(2, 4),
        top_k=3,
        num_negatives=2,
        criterion=ContinuousAPLoss(tau=0.3, weight_offset=5.0),
    )
    assert isinstance(default.criterion, ContinuousAPLoss)
    assert default.criterion.tau == 0.3
    # CoTAPLoss passes its own weights, so the criterion's weight_offset is unused.
    torch.testing.assert_close(default(**inputs), given(**inputs))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(criterion=ContinuousAPLoss(), tau=0.3), "tau and kappa"),
        (dict(criterion=ContinuousAPLoss(), kappa=2.0), "tau and kappa"),
        (dict(criterion=lambda **kw: kw["scores"].sum()), "nn.Module"),
        (dict(weight_offset=float("nan")), "weight_offset"),
    ],
)
def test_cotap_loss_bad_criterion_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CoTAPLoss(**kwargs)
