from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from lightly.models.utils import get_at_index
from torch import Tensor, nn

from lightly_cotap.loss import ContinuousAPLoss, _ranking_ops, cotap_loss, value_checks
from lightly_cotap.loss.cotap_cells import (
    draw_negative_images,
    pair_similarities,
    pool_cells,
    select_foreground_cells,
)
from lightly_cotap.loss.cotap_loss import CoTAPLoss
from lightly_cotap.loss.cotap_objective import CoTAPObjective

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
    """Mean of the (i, j) cell of a p x p pooling of crop v of image b (h % p == 0).

    ``features`` is (B, V, h, w, K) (channel-last features) or (B, V, h, w) (masks).
    """
    h, w = features.shape[2:4]
    sh, sw = h // p, w // p
    block = features[b, v, i * sh : (i + 1) * sh, j * sw : (j + 1) * sw]
    return block.reshape(-1, *block.shape[2:]).mean(0)


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
    negatives: list[list[int]] | None = None,
) -> Tensor:
    """CoTAP loss; image b's negatives are ``negatives[b]`` (default: every other
    image of the batch, R = B - 1).
    """
    batch = student_x.shape[0]
    if negatives is None:
        negatives = [[c for c in range(batch) if c != b] for b in range(batch)]
    losses = []
    for p in pool_sizes:
        scores: list[Tensor] = []
        targets: list[float] = []
        weights: list[float] = []
        sel_x = [_reference_selection(fg_mask_x, b, p, top_k) for b in range(batch)]
        sel_pos = [_reference_selection(fg_mask_pos, b, p, top_k) for b in range(batch)]
        pairs = [(b, c) for b in range(batch) for c in [b, *negatives[b]]]
        for b, c in pairs:
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


def _reference_of(
    inputs: dict[str, Tensor],
    *,
    pool_sizes: tuple[int, ...],
    top_k: int,
    negatives: list[list[int]] | None = None,
    negative_weight: float = 0.1,
) -> Tensor:
    """:func:`_reference_loss` of a batch of :func:`_random_batch`."""
    return _reference_loss(
        student_x=inputs["student_x"],
        student_pos=inputs["student_pos"],
        teacher_x=inputs["teacher_x"],
        teacher_pos=inputs["teacher_pos"],
        fg_mask_x=inputs["fg_mask_x"],
        fg_mask_pos=inputs["fg_mask_pos"],
        pool_sizes=pool_sizes,
        top_k=top_k,
        negatives=negatives,
        negative_weight=negative_weight,
    )


def _random_batch(
    batch: int = 3, crops: int = 2, dim: int = 5, size: int = 4, seed: int = 0
) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def feats() -> Tensor:
        return torch.randn(
            batch, crops, size, size, dim, generator=gen, dtype=torch.float64
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

    expected = _reference_of(inputs, pool_sizes=(2, 4), top_k=3)
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
        dim=-1,
    ).double()  # (B, V, h, w, 4)
    cells = pool_cells(grid, size)  # (B, V*h*w, 4)
    for mask, expected in ((mask_x, expected_x), (mask_pos, expected_pos)):
        index = select_foreground_cells(mask, pool_size=size, top_k=4)
        picked = get_at_index(cells, index)  # (B, 4, 4)
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
    features = torch.arange(2 * 3 * 4 * 4 * 1, dtype=torch.float64).reshape(
        2, 3, 4, 4, 1
    )
    cells = pool_cells(features, 2)
    assert cells.shape == (2, 12, 1)
    for b, v, i, j in itertools.product(range(2), range(3), range(2), range(2)):
        block = features[b, v, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, 0].mean()
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
    with pytest.raises(ValueError, match=r"\[0, 0\], got num_negatives=1"):
        draw_negative_images(batch_size=1, num_negatives=1)  # itself: no negative


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


@pytest.mark.parametrize("random_tie_break", [False, True])
def test_cotap_loss_single_image_and_empty_foreground(random_tie_break: bool) -> None:
    inputs = _random_batch(batch=1, seed=5)
    inputs["fg_mask_x"] = torch.zeros_like(inputs["fg_mask_x"], dtype=torch.bool)
    loss_fn = CoTAPLoss(pool_sizes=(2, 4), top_k=2, random_tie_break=random_tie_break)
    loss = loss_fn(**inputs)
    (grad,) = torch.autograd.grad(loss, inputs["student_x"])
    assert float(grad.abs().sum()) > 0
    if random_tie_break:
        # Any 2 of the tied background cells may be drawn, so the value depends on
        # the draw; like every loss of this kind it lies in (0, 1).
        assert 0.0 < float(loss.detach()) < 1.0
        return
    # No other image: own pairs only; every cell of x ties, the first cells win.
    expected = _reference_of(inputs, pool_sizes=(2, 4), top_k=2)
    (expected_grad,) = torch.autograd.grad(expected, inputs["student_x"])
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12)


def test_cotap_loss_zero_weights_keep_graph() -> None:
    inputs = _random_batch(batch=2, seed=6)
    # Teacher targets all -1 (anti-parallel x and x+ cells) -> weights (t + 0.2)_+ = 0.
    inputs["teacher_pos"] = -inputs["teacher_x"]
    inputs["fg_mask_pos"] = inputs["fg_mask_x"]
    loss = CoTAPLoss(pool_sizes=(4,), top_k=1, num_negatives=0)(**inputs)
    assert loss.item() == 0.0
    loss.backward()
    assert inputs["student_x"].grad is not None


def test_cotap_loss_float32_and_bool_masks_match_float64_reference() -> None:
    inputs = _random_batch(batch=3, seed=7)
    inputs = {k: v.detach().float() for k, v in inputs.items()}
    inputs["student_x"].requires_grad_()
    inputs["fg_mask_x"] = inputs["fg_mask_x"] > 0.5
    inputs["fg_mask_pos"] = inputs["fg_mask_pos"] > 0.5
    # Binary masks tie; the reference keeps the first cells among equal fractions.
    loss = CoTAPLoss(pool_sizes=(2, 4), top_k=3, random_tie_break=False)(**inputs)
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, inputs["student_x"])
    reference_inputs = {
        k: v.double() if v.is_floating_point() else v for k, v in inputs.items()
    }
    reference_inputs["student_x"] = reference_inputs["student_x"].detach()
    reference_inputs["student_x"].requires_grad_()
    expected = _reference_of(reference_inputs, pool_sizes=(2, 4), top_k=3)
    (expected_grad,) = torch.autograd.grad(expected, reference_inputs["student_x"])
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        grad.double(),
        expected_grad,
        rtol=1e-3,
        atol=1e-5 * float(expected_grad.abs().max()),
    )


# ----------------------------------------------------------------------------------
# Tie-breaking on binary masks (the case where ties happen).
# ----------------------------------------------------------------------------------


def _all_foreground_batch(sides: tuple[str, ...] = ("x", "pos")) -> dict[str, Tensor]:
    """Continuous masks, fully foreground (all cells tie) on the given sides."""
    inputs = _random_batch(batch=2, seed=10)
    for side in sides:
        name = f"fg_mask_{side}"
        inputs[name] = torch.ones_like(inputs[name], dtype=torch.bool)
    return inputs


@pytest.mark.parametrize("sides", [("x", "pos"), ("x",), ("pos",)])
def test_cotap_loss_breaks_ties_at_random_by_default(sides: tuple[str, ...]) -> None:
    inputs = _all_foreground_batch(sides)
    # 2 images, 1 negative each: the negatives do not depend on the draw, only the
    # choice among the 32 tied cells of the tied side(s) can.
    default = CoTAPLoss(pool_sizes=(4,), top_k=2, num_negatives=1)
    assert default.random_tie_break
    by_index = CoTAPLoss(
        pool_sizes=(4,), top_k=2, num_negatives=1, random_tie_break=False
    )
    losses, losses_by_index = set(), set()
    for seed in range(6):
        torch.manual_seed(seed)
        losses.add(float(default(**inputs).detach()))
        torch.manual_seed(seed)
        losses_by_index.add(float(by_index(**inputs).detach()))
    assert len(losses) > 1
    # Without random tie-breaks the first cells (all in crop 0) always win.
    assert len(losses_by_index) == 1
    expected = _reference_of(inputs, pool_sizes=(4,), top_k=2)
    assert losses_by_index.pop() == pytest.approx(float(expected.detach()), rel=1e-10)


def test_select_foreground_cells_default_draws_tied_cells_uniformly() -> None:
    # 1 image, 2 crops of 4 x 4 fully foreground cells: 32 tied cells.
    mask = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    torch.manual_seed(0)
    counts = torch.zeros(32)
    for _ in range(320):
        counts[select_foreground_cells(mask, pool_size=4, top_k=1)[0, 0]] += 1
    assert bool((counts > 0).all())  # crop 1 too, not only the first cells
    assert float(counts[16:].sum()) == pytest.approx(160, abs=40)
    first = select_foreground_cells(mask, pool_size=4, top_k=3, random_tie_break=False)
    assert first.tolist() == [[0, 1, 2]]


def test_cotap_objective_breaks_ties_at_random_by_default() -> None:
    objective = CoTAPObjective(patch_queue_size=16, cls_queue_size=16)
    assert objective.cotap_loss.random_tie_break


# ----------------------------------------------------------------------------------
# Long lists: the fast ranking path.
# ----------------------------------------------------------------------------------


def _count_ranking_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    module = "lightly_cotap.loss.continuous_ap_loss"
    for name, label in (
        ("dense_negatives_and_positives", "dense"),
        ("fast_negatives_and_positives", "fast"),
    ):
        original = getattr(_ranking_ops, name)

        def spy(
            *args: Any, _original: Any = original, _label: str = label, **kwargs: Any
        ) -> Any:
            calls.append(_label)
            return _original(*args, **kwargs)

        monkeypatch.setattr(f"{module}.{name}", spy)
    return calls


def test_cotap_loss_fast_path_matches_dense_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 8 images * 5**2 pairs of kept cells * (own x+ and 5 negatives):
    # n = 8 * 25 * 6 = 1,200 items per pool size, past the dense limit of 512.
    inputs = _random_batch(batch=8, seed=11)
    calls = _count_ranking_paths(monkeypatch)
    results = []
    for method in ("auto", "dense"):
        loss_fn = CoTAPLoss(
            pool_sizes=(2, 4),
            top_k=5,
            num_negatives=5,
            criterion=ContinuousAPLoss(method=method),
        )
        torch.manual_seed(0)
        loss = loss_fn(**inputs)
        grads = torch.autograd.grad(loss, [inputs["student_x"], inputs["student_pos"]])
        results.append((loss, grads))
    assert calls == ["fast", "fast", "dense", "dense"]
    (fast, fast_grads), (dense, dense_grads) = results
    torch.testing.assert_close(fast, dense, rtol=1e-10, atol=0.0)
    for g, e in zip(fast_grads, dense_grads):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-13)


def _chunked_reference_ap(
    scores: Tensor, targets: Tensor, weights: Tensor, tau: float, chunk: int = 200
) -> tuple[Tensor, Tensor]:
    """Float64 loss and d loss / d scores from the formula, anchors in chunks."""
    s = scores.detach().double().requires_grad_()
    t, w = targets.double(), weights.double()
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, len(s), chunk):
        s_i, t_i = s[start : start + chunk, None], t[start : start + chunk, None]
        x = s_i - s[None]
        # phi_tau without branches: (1 - x/tau)_+^2 is the quadratic piece on
        # [0, tau) and 0 above; below 0 it exceeds 1 - 2x/tau by (x/tau)^2.
        phi = (1 - x / tau).clamp_min(0) ** 2 - (x.clamp_max(0) / tau) ** 2
        neg = ((t_i - t[None]).clamp_min(0) * phi).sum(1)
        pos = ((t[None] >= t_i) & (s[None] >= s_i)).sum(1).detach()
        u = neg / pos
        part = (w[start : start + chunk] * u / (1 + u)).sum() / w.sum()
        part.backward()
        total += part.detach()
    assert s.grad is not None
    return total, s.grad


@pytest.mark.slow
def test_cotap_loss_training_size_list_matches_float64_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The list of a training step: 64 images, 2 crops of 14 x 14 float32 features,
    binary masks, top 5 of the 7 x 7 cells, 5 negatives: 64 * 25 * 6 = 9,600 items.
    """
    gen = torch.Generator().manual_seed(12)
    shape = (64, 2, 14, 14, 16)
    teacher_x, teacher_pos = (
        torch.randn(shape, generator=gen),
        torch.randn(shape, generator=gen),
    )
    inputs = dict(
        student_x=(
            teacher_x + 0.7 * torch.randn(shape, generator=gen)
        ).requires_grad_(),
        student_pos=teacher_pos + 0.7 * torch.randn(shape, generator=gen),
        teacher_x=teacher_x,
        teacher_pos=teacher_pos,
        fg_mask_x=torch.rand(64, 2, 14, 14, generator=gen) > 0.6,
        fg_mask_pos=torch.rand(64, 2, 14, 14, generator=gen) > 0.6,
    )
    criterion = ContinuousAPLoss(tau=0.5, kappa=1.0)
    loss_fn = CoTAPLoss(pool_sizes=(7,), criterion=criterion)
    lists: list[dict[str, Tensor]] = []
    rank = criterion.forward

    def record(*, scores: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
        scores.retain_grad()
        lists.append(dict(scores=scores, targets=targets, weights=weights))
        return rank(scores=scores, targets=targets, weights=weights)

    monkeypatch.setattr(criterion, "forward", record)
    calls = _count_ranking_paths(monkeypatch)
    loss = loss_fn(**inputs)
    loss.backward()
    assert calls == ["fast"] and len(lists) == 1
    ranked = lists[0]
    assert ranked["scores"].shape == (9600,) and ranked["scores"].dtype == torch.float32
    expected, expected_grad = _chunked_reference_ap(
        ranked["scores"], ranked["targets"], ranked["weights"], tau=0.5
    )
    grad = ranked["scores"].grad
    assert grad is not None
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(
        grad.double(),
        expected_grad,
        rtol=1e-4,
        atol=1e-6 * float(expected_grad.abs().max()),
    )


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


@pytest.mark.parametrize(
    "name", ["student_x", "student_pos", "teacher_x", "teacher_pos"]
)
def test_cotap_loss_bad_feature_shapes(name: str) -> None:
    inputs = _random_batch(batch=3, seed=8)
    loss_fn = CoTAPLoss(pool_sizes=(2, 4))
    with pytest.raises(
        ValueError,
        match=rf"^{name} must have shape \(B, V, h, w, K\), got \(3, 4, 4, 5\)\.$",
    ):
        loss_fn(**dict(inputs, **{name: inputs[name][:, 0]}))
    with pytest.raises(
        ValueError,
        match=rf"^{name} must have shape \(B, V, h, w, K\), got <class 'list'>",
    ):
        loss_fn(**dict(inputs, **{name: [1.0]}))
    if name != "student_x":
        with pytest.raises(
            ValueError,
            match=rf"^{name} must have the shape of student_x \(3, 2, 4, 4, 5\), "
            r"got \(1, 2, 4, 4, 5\)\.$",
        ):
            loss_fn(**dict(inputs, **{name: inputs[name][:1]}))


@pytest.mark.parametrize("name", ["fg_mask_x", "fg_mask_pos"])
def test_cotap_loss_bad_mask_shapes(name: str) -> None:
    inputs = _random_batch(batch=3, seed=8)
    loss_fn = CoTAPLoss(pool_sizes=(2, 4))
    expected = rf"^{name} must have shape \(B, V, h, w\) = \(3, 2, 4, 4\) matching "
    # Mask with crop and image axes swapped (the official-code ordering bug).
    with pytest.raises(
        ValueError, match=expected + r"the features, got \(2, 3, 4, 4\)"
    ):
        loss_fn(**dict(inputs, **{name: inputs[name].transpose(0, 1)}))
    with pytest.raises(ValueError, match=expected + "the features, got <class 'list'>"):
        loss_fn(**dict(inputs, **{name: [0.5]}))


def test_cotap_loss_bad_shapes() -> None:
    inputs = _random_batch(batch=3, seed=8)
    with pytest.raises(ValueError, match="pool_sizes"):
        CoTAPLoss(pool_sizes=(7,))(**inputs)
    # No image or no crop.
    for empty in (slice(0, 0), slice(None)):
        crops = slice(0, 0) if empty == slice(None) else slice(None)
        bad = {k: v[empty][:, crops] for k, v in inputs.items()}
        with pytest.raises(ValueError, match="at least one image and crop"):
            CoTAPLoss(pool_sizes=(2,))(**bad)


def test_cotap_loss_one_crop_matches_reference() -> None:
    inputs = {k: v.detach()[:, :1] for k, v in _random_batch(batch=3, seed=13).items()}
    inputs["student_x"].requires_grad_()
    loss = CoTAPLoss(pool_sizes=(2, 4), top_k=3)(**inputs)
    expected = _reference_of(inputs, pool_sizes=(2, 4), top_k=3)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


def test_cotap_loss_defaults_follow_the_paper() -> None:
    loss_fn = CoTAPLoss()
    assert loss_fn.pool_sizes == (7, 14)
    assert (loss_fn.top_k, loss_fn.num_negatives) == (5, 5)
    assert loss_fn.negative_weight == 0.1
    ranking = loss_fn.criterion
    assert isinstance(ranking, ContinuousAPLoss)
    assert (ranking.tau, ranking.kappa, loss_fn.weight_offset) == (0.5, 1.0, -0.2)
    assert loss_fn.random_tie_break and not loss_fn.gather_distributed


def test_cotap_loss_gather_distributed_without_process_group() -> None:
    # Outside torch.distributed (or with one process) nothing is gathered.
    inputs = _random_batch(batch=3, seed=14)
    values = []
    for gather in (False, True):
        torch.manual_seed(0)
        values.append(CoTAPLoss(pool_sizes=(2, 4), gather_distributed=gather)(**inputs))
    torch.testing.assert_close(values[1], values[0], rtol=0.0, atol=0.0)


def test_pair_similarities_of_bf16_cells_are_float32() -> None:
    gen = torch.Generator().manual_seed(0)
    anchors = torch.randn(3, 2, 8, generator=gen).bfloat16()
    positives = torch.randn(3, 4, 8, generator=gen).bfloat16()
    negatives = torch.tensor([[1], [2], [0]])
    sim, _ = pair_similarities(
        anchors=anchors, positives=positives, negative_index=negatives
    )
    expected, _ = pair_similarities(
        anchors=anchors.float(), positives=positives.float(), negative_index=negatives
    )
    assert sim.dtype == torch.float32
    torch.testing.assert_close(sim, expected, rtol=1e-6, atol=1e-6)


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
        get_at_index(pool_cells(inputs[name], 2), index)
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


# ----------------------------------------------------------------------------------
# Distributed paths in one process: rank 0 of two emulated by patching lightly's
# dist.world_size / dist.gather and torch.distributed.broadcast, so that every
# mutation-test run reaches them (the real 2-process run is test_cotap_loss_ddp.py).
# ----------------------------------------------------------------------------------


def _rank_one(x: Tensor) -> Tensor:
    """Rank 1's batch made from rank 0's features or cells (B, ..., K): the images
    in reverse order, the channels scaled unequally (other cosines, no ties).
    """
    return x.flip(0) * torch.linspace(0.5, 2.0, x.shape[-1], dtype=x.dtype)


def _emulate_rank_zero_of_two(
    monkeypatch: pytest.MonkeyPatch, *, rank_zero_order: Tensor, size_change: int = 0
) -> list[tuple[Tensor, Any]]:
    """Makes this process rank 0 of 2. Rank 1 holds :func:`_rank_one` of every
    gathered float tensor and ``B + size_change`` images; every broadcast receives
    ``rank_zero_order``. Returns the (sent tensor, src) of the broadcasts.
    """
    broadcasts: list[tuple[Tensor, Any]] = []

    def gather(tensor: Tensor) -> tuple[Tensor, Tensor]:
        if not tensor.is_floating_point():  # the batch sizes
            return tensor, tensor + size_change
        return tensor, _rank_one(tensor.detach())

    def broadcast(tensor: Tensor, src: Any) -> None:
        broadcasts.append((tensor.clone(), src))
        tensor.copy_(rank_zero_order)

    monkeypatch.setattr(cotap_loss.dist, "world_size", lambda: 2)
    monkeypatch.setattr(cotap_loss.dist, "gather", gather)
    monkeypatch.setattr(torch.distributed, "broadcast", broadcast)
    return broadcasts


def _following(order: list[int], count: int) -> list[list[int]]:
    """Per image, the ``count`` images that follow it in the cyclic ``order``."""
    position = {image: i for i, image in enumerate(order)}
    return [
        [order[(position[b] + s) % len(order)] for s in range(1, count + 1)]
        for b in range(len(order))
    ]


def test_cotap_loss_ranks_the_gathered_batch_with_rank_zeros_draw(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inputs = _random_batch(batch=3, seed=15)
    order = [3, 0, 5, 1, 4, 2]  # rank 0's cyclic order of the 6 gathered images
    broadcasts = _emulate_rank_zero_of_two(
        monkeypatch, rank_zero_order=torch.tensor(order)
    )
    loss_fn = CoTAPLoss(
        pool_sizes=(2, 4), top_k=2, num_negatives=2, gather_distributed=True
    )
    torch.manual_seed(0)
    loss = loss_fn(**inputs)
    (grad,) = torch.autograd.grad(loss, inputs["student_x"])
    # Each pool size broadcasts this rank's own draw of the 6 images from rank 0.
    assert [src for _, src in broadcasts] == [0, 0]
    for sent, _ in broadcasts:
        assert sent.dtype == torch.int64 and sorted(sent.tolist()) == list(range(6))
    # Reference: the concatenated batch of both ranks; gradients reach this rank's
    # features only through its own part of the gathered cells.
    both = {
        name: torch.cat([value, _rank_one(value.detach())])
        for name, value in inputs.items()
        if name.startswith(("student", "teacher"))
    }
    for name in ("fg_mask_x", "fg_mask_pos"):
        both[name] = torch.cat([inputs[name], inputs[name].flip(0)])
    expected = _reference_of(
        both, pool_sizes=(2, 4), top_k=2, negatives=_following(order, 2)
    )
    (expected_grad,) = torch.autograd.grad(expected, inputs["student_x"])
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12)
    # The draw matters: another order of the 6 images gives another loss.
    other = _reference_of(
        both, pool_sizes=(2, 4), top_k=2, negatives=_following(order[::-1], 2)
    )
    assert abs(float((other - expected).detach())) > 1e-6


def test_cotap_loss_refuses_unequal_batches_of_the_ranks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inputs = _random_batch(batch=3, seed=15)
    _emulate_rank_zero_of_two(
        monkeypatch, rank_zero_order=torch.arange(6), size_change=-1
    )
    loss_fn = CoTAPLoss(pool_sizes=(2,), top_k=2, gather_distributed=True)
    with pytest.raises(
        ValueError,
        match=r"^gather_distributed=True needs the same batch size on every rank, "
        r"got batch sizes \[3, 2\] on ranks 0\.\.1 \(student_x of shape "
        r"\(3, 2, 4, 4, 5\) here\)",
    ):
        loss_fn(**inputs)


def test_cotap_loss_without_gather_distributed_stays_on_its_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inputs = _random_batch(batch=3, seed=16)
    _emulate_rank_zero_of_two(monkeypatch, rank_zero_order=torch.arange(6))

    def no_gather(tensor: Tensor) -> None:
        raise AssertionError("gathered without gather_distributed")

    monkeypatch.setattr(cotap_loss.dist, "gather", no_gather)
    loss = CoTAPLoss(pool_sizes=(2, 4), top_k=2, num_negatives=2)(**inputs)
    expected = _reference_of(inputs, pool_sizes=(2, 4), top_k=2)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------
# Cell helpers: sort stability on long lists, autocast.
# ----------------------------------------------------------------------------------


def test_select_foreground_cells_without_random_ties_keeps_the_first_of_many() -> None:
    # 2 crops of 32 x 32 one-pixel cells: 2,048 cells per image, half of them tied
    # at 1, enough for an unstable sort to reorder the ties.
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 2, 32, 32, generator=gen) > 0.5
    index = select_foreground_cells(mask, pool_size=32, top_k=8, random_tie_break=False)
    for b in range(2):
        first = [i for i, on in enumerate(mask[b].flatten().tolist()) if on][:8]
        assert index[b].tolist() == first


def test_pair_similarities_under_cpu_autocast_stay_float32() -> None:
    gen = torch.Generator().manual_seed(1)
    anchors = torch.randn(3, 2, 8, generator=gen, dtype=torch.float64)
    positives = torch.randn(3, 4, 8, generator=gen, dtype=torch.float64)
    negatives = torch.tensor([[1], [2], [0]])
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        sim, _ = pair_similarities(
            anchors=anchors.float(),
            positives=positives.float(),
            negative_index=negatives,
        )
    assert sim.dtype == torch.float32
    for b, r, i, j in itertools.product(range(3), range(2), range(2), range(4)):
        other = b if r == 0 else int(negatives[b, r - 1])
        expected = _cos(anchors[b, i], positives[other, j])
        assert float(sim[b, r, i, j]) == pytest.approx(float(expected), abs=1e-6)


# ----------------------------------------------------------------------------------
# Argument edges: the smallest valid values.
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pool_sizes", [(True,), (2.0,)])
def test_cotap_loss_pool_sizes_must_be_ints(pool_sizes: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError, match="pool_sizes"):
        CoTAPLoss(pool_sizes=pool_sizes)


def test_cotap_loss_one_cell_per_crop_and_unweighted_negatives() -> None:
    inputs = _random_batch(batch=3, seed=17)
    # Pool size 1: every crop is one cell (2 cells per image, both kept).
    loss = CoTAPLoss(pool_sizes=(1,), top_k=2)(**inputs)
    expected = _reference_of(inputs, pool_sizes=(1,), top_k=2)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    # negative_weight 0: other-image pairs are ranked but carry no anchor weight.
    loss = CoTAPLoss(pool_sizes=(2,), top_k=2, negative_weight=0.0)(**inputs)
    expected = _reference_of(inputs, pool_sizes=(2,), top_k=2, negative_weight=0.0)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


def test_cotap_loss_mask_checks_only_with_value_checks() -> None:
    inputs = _random_batch(batch=2, seed=9)
    loss_fn = CoTAPLoss(pool_sizes=(4,))
    torch.manual_seed(0)
    plain = loss_fn(**inputs)
    with value_checks():  # finite float masks pass the checks
        torch.manual_seed(0)
        checked = loss_fn(**inputs)
    torch.testing.assert_close(checked, plain, rtol=0.0, atol=0.0)
    mask = inputs["fg_mask_x"].clone()
    mask[0, 0, 0, 0] = float("inf")
    loss_fn(**dict(inputs, fg_mask_x=mask))  # not checked by default: no error


def test_cotap_loss_configures_its_default_criterion() -> None:
    inputs = _random_batch(seed=18)
    loss_fn = CoTAPLoss(pool_sizes=(2,), top_k=2, tau=0.3, kappa=2.0, weight_offset=0.1)
    criterion = loss_fn.criterion
    assert isinstance(criterion, ContinuousAPLoss)
    assert (criterion.tau, criterion.kappa, criterion.weight_offset) == (0.3, 2.0, 0.1)
    given = CoTAPLoss(
        pool_sizes=(2,),
        top_k=2,
        weight_offset=0.1,
        criterion=ContinuousAPLoss(tau=0.3, kappa=2.0),
    )
    unscaled = CoTAPLoss(pool_sizes=(2,), top_k=2, tau=0.3, weight_offset=0.1)
    torch.testing.assert_close(loss_fn(**inputs), given(**inputs))
    assert abs(float((loss_fn(**inputs) - unscaled(**inputs)).detach())) > 1e-6
