from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from ranking_lists import random_lists, value_and_grad
from sklearn.metrics import average_precision_score
from torch import Tensor

from lightly_cotap.loss import (
    ContinuousAPLoss,
    HingeContinuousAPLoss,
    _ranking_ops,
    value_checks,
)
from lightly_cotap.loss import continuous_ap_loss as cap
from lightly_cotap.train.host_sync import forbid_host_sync

TAU = 0.5


def _phi(x: Tensor, tau: float) -> Tensor:
    """phi_tau written piece by piece from the definition."""
    if x < 0:
        return 1 - 2 * x / tau
    if x < tau:
        return (1 - x / tau) ** 2
    return x * 0.0


def _step(x: Tensor, tau: float) -> Tensor:
    """The exact step 1[s_j >= s_i] = 1[x <= 0] that phi_tau smooths."""
    return (x <= 0).to(x.dtype)


def reference_loss(
    scores: Tensor,
    targets: Tensor,
    weights: Tensor | None = None,
    mask: Tensor | None = None,
    tau: float = TAU,
    kappa: float = 1.0,
    weight_offset: float = -0.2,
    surrogate: Callable[[Tensor, float], Tensor] = _phi,
) -> Tensor:
    """Loop-by-loop float64 reference of the loss, written from the formula."""
    s2 = scores if scores.dim() == 2 else scores[None]
    t2 = targets if targets.dim() == 2 else targets[None]
    w2 = None if weights is None else (weights if weights.dim() == 2 else weights[None])
    m2 = None if mask is None else (mask if mask.dim() == 2 else mask[None])
    numerator = s2.sum() * 0.0
    denominator = 0.0
    for b in range(s2.shape[0]):
        keep = [i for i in range(s2.shape[1]) if m2 is None or bool(m2[b, i])]
        for i in keep:
            w_i = (
                max(float(t2[b, i]) - weight_offset, 0.0)
                if w2 is None
                else float(w2[b, i])
            )
            neg = s2.sum() * 0.0
            pos = 0
            for j in keep:
                gap = max(float(t2[b, i] - t2[b, j]), 0.0)
                if gap > 0:
                    neg = neg + gap * surrogate(s2[b, i] - s2[b, j], tau)
                if t2[b, j] >= t2[b, i] and s2[b, j] >= s2[b, i]:
                    pos += 1
            u = kappa * neg / pos
            numerator = numerator + w_i * u / (1 + u)
            denominator += w_i
    return numerator / denominator


@pytest.mark.parametrize("method", ["dense", "fast"])
@pytest.mark.parametrize("shape", [(23,), (3, 17)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("use_weights", [False, True])
def test_matches_reference(
    method: str,
    shape: tuple[int, ...],
    ties: bool,
    use_mask: bool,
    use_weights: bool,
) -> None:
    s, t = random_lists(shape, ties=ties, seed=hash((shape, ties)) % 1000)
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(shape, generator=gen) > 0.25 if use_mask else None
    weights = (
        torch.rand(shape, generator=gen, dtype=torch.float64) if use_weights else None
    )
    loss_fn = ContinuousAPLoss(method=method)
    value, grad = value_and_grad(loss_fn, s, targets=t, weights=weights, mask=mask)
    ref_value, ref_grad = value_and_grad(
        reference_loss, s, targets=t, weights=weights, mask=mask
    )
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kappa, tau, offset", [(2.0, 0.3, 0.0), (0.5, 1.5, -1.0)])
def test_hyperparameters_match_reference(
    kappa: float, tau: float, offset: float
) -> None:
    s, t = random_lists((2, 15), ties=False, seed=3)
    for method in ("dense", "fast"):
        loss_fn = ContinuousAPLoss(
            tau=tau, kappa=kappa, weight_offset=offset, method=method
        )
        value, grad = value_and_grad(loss_fn, s, targets=t)
        ref_value, ref_grad = value_and_grad(
            lambda **kw: reference_loss(
                tau=tau, kappa=kappa, weight_offset=offset, **kw
            ),
            s,
            targets=t,
        )
        torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_auto_fast_path_matches_float64_dense(ties: bool, dtype: torch.dtype) -> None:
    # 2 lists of 400 items: 320,000 pair entries, past the CPU bound of 2**18, so
    # the default loss takes the sort-based path.
    s, t = random_lists((2, 400), ties=ties, seed=7)
    s, t = s.to(dtype), t.to(dtype)
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(2, 400, generator=gen) > 0.1
    weights = torch.rand(2, 400, generator=gen).to(dtype)
    loss_fn = ContinuousAPLoss()
    assert not loss_fn.uses_dense(s)
    # The reference: the dense path in float64 on the same (rounded) values.
    dense = ContinuousAPLoss(method="dense")
    for w in (None, weights):
        value, grad = value_and_grad(loss_fn, s, targets=t, mask=mask, weights=w)
        ref_value, ref_grad = value_and_grad(
            dense,
            s.double(),
            targets=t.double(),
            mask=mask,
            weights=None if w is None else w.double(),
        )
        assert value.dtype == grad.dtype == dtype
        if dtype == torch.float64:
            torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=0.0)
            torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-15)
        else:
            torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=0.0)
            torch.testing.assert_close(
                grad.double(),
                ref_grad,
                rtol=1e-4,
                atol=1e-6 * float(ref_grad.abs().max()),
            )


def test_negatives_and_positives_agree_per_item() -> None:
    s, t = random_lists((4, 300), ties=True, seed=11)
    valid = torch.rand(4, 300, generator=torch.Generator().manual_seed(0)) > 0.2
    neg_d, pos_d = _ranking_ops.dense_negatives_and_positives(s, t, valid, TAU)
    rows = torch.arange(4)[:, None].expand(4, 300)
    neg_f, pos_f = _ranking_ops.fast_negatives_and_positives(
        s[valid], t[valid], rows[valid], TAU
    )
    torch.testing.assert_close(neg_f, neg_d[valid], rtol=1e-9, atol=1e-9)
    assert torch.equal(pos_f, pos_d[valid])
    assert bool((pos_f >= 1).all())


def test_auto_method_switches_on_list_size(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    module = "lightly_cotap.loss.continuous_ap_loss"
    dense_fn = _ranking_ops.dense_negatives_and_positives
    fast_fn = _ranking_ops.fast_negatives_and_positives

    def dense_spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append("dense")
        return dense_fn(*args, **kwargs)

    def fast_spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append("fast")
        return fast_fn(*args, **kwargs)

    monkeypatch.setattr(f"{module}.dense_negatives_and_positives", dense_spy)
    monkeypatch.setattr(f"{module}.fast_negatives_and_positives", fast_spy)
    loss_fn = ContinuousAPLoss(dense_max_pairs=100 * 100)
    loss_fn(scores=torch.randn(100), targets=torch.rand(100))
    loss_fn(scores=torch.randn(101), targets=torch.rand(101))
    assert calls == ["dense", "fast"]
    # B lists of n items count B * n * n pair entries: 4 rows of 50 reach the limit,
    # 4 rows of 51 pass it, 5 rows of 45 pass it although each row is shorter.
    calls.clear()
    loss_fn(scores=torch.randn(4, 50), targets=torch.rand(4, 50))
    loss_fn(scores=torch.randn(4, 51), targets=torch.rand(4, 51))
    loss_fn(scores=torch.randn(5, 45), targets=torch.rand(5, 45))
    assert calls == ["dense", "fast", "fast"]
    # The explicit methods ignore the size.
    calls.clear()
    ContinuousAPLoss(method="dense", dense_max_pairs=0)(
        scores=torch.randn(2, 8), targets=torch.rand(2, 8)
    )
    ContinuousAPLoss(method="fast", dense_max_pairs=10**9)(
        scores=torch.randn(2, 8), targets=torch.rand(2, 8)
    )
    assert calls == ["dense", "fast"]
    calls.clear()
    default = ContinuousAPLoss()  # CPU: the measured crossover at 512 items
    default(scores=torch.randn(512), targets=torch.rand(512))
    default(scores=torch.randn(513), targets=torch.rand(513))
    default(scores=torch.randn(2, 363), targets=torch.rand(2, 363))
    assert calls == ["dense", "fast", "fast"]


def test_cpu_fast_path_counts_distinct_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU the fast path gets no level bound (it counts the distinct targets)."""
    seen: list[object] = []
    fast = _ranking_ops.fast_negatives_and_positives

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs["row_length"])
        return fast(*args, **kwargs)

    monkeypatch.setattr(cap, "fast_negatives_and_positives", spy)
    ContinuousAPLoss(method="fast")(scores=torch.randn(2, 8), targets=torch.rand(2, 8))
    assert seen == [None]


def test_default_bound_uses_the_compute_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[torch.device, torch.dtype]] = []

    def spy(device: torch.device, dtype: torch.dtype) -> int:
        calls.append((device, dtype))
        return 0

    monkeypatch.setattr(cap, "default_dense_max_pairs", spy)
    loss_fn = ContinuousAPLoss()
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        assert not loss_fn.uses_dense(torch.zeros(2, 3, dtype=dtype))
    cpu = torch.device("cpu")
    assert calls == [(cpu, torch.float64), (cpu, torch.float32), (cpu, torch.float32)]


def test_cuda_bound_reads_the_memory_of_the_scores_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    memory = {0: 80 * 2**30, 1: 40 * 2**30}
    monkeypatch.setattr(cap, "_cuda_total_memory", lambda index: memory[index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    bound = cap.default_dense_max_pairs
    assert bound(torch.device("cuda", 0), torch.float32) == 20 * 2**30 // 40
    assert bound(torch.device("cuda", 1), torch.float32) == 10 * 2**30 // 40
    # No index: the current device.
    assert bound(torch.device("cuda"), torch.float32) == 10 * 2**30 // 40


def test_cuda_total_memory_is_read_once_per_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads: list[int] = []

    class Properties:
        def __init__(self, total_memory: float) -> None:
            self.total_memory = total_memory

    def properties(index: int) -> Properties:
        reads.append(index)
        return Properties(float(2**30 * (index + 1)))

    monkeypatch.setattr(cap, "_CUDA_TOTAL_MEMORY", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    assert cap._cuda_total_memory(1) == 2 * 2**30
    assert cap._cuda_total_memory(0) == 2**30
    assert cap._cuda_total_memory(1) == 2 * 2**30
    assert isinstance(cap._cuda_total_memory(0), int)
    assert reads == [1, 0]


def test_default_dense_bound_depends_on_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = torch.device("cpu")
    assert cap.default_dense_max_pairs(cpu, torch.float32) == 2**18
    assert cap.default_dense_max_pairs(cpu, torch.float64) == 2**18
    # CUDA: a quarter of the device memory at 10 (B, n, n) tensors of the dtype.
    monkeypatch.setattr(cap, "_cuda_total_memory", lambda index: 80 * 2**30)
    gpu = torch.device("cuda", 0)
    assert cap.default_dense_max_pairs(gpu, torch.float32) == 20 * 2**30 // 40
    assert cap.default_dense_max_pairs(gpu, torch.float64) == 20 * 2**30 // 80
    # An explicit bound overrides the device default.
    assert not ContinuousAPLoss(dense_max_pairs=99).uses_dense(torch.zeros(10))
    assert ContinuousAPLoss(dense_max_pairs=100).uses_dense(torch.zeros(10))
    assert ContinuousAPLoss(method="dense").uses_dense(torch.zeros(10**6))
    assert not ContinuousAPLoss(method="fast").uses_dense(torch.zeros(2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_step_surrogate_gives_one_minus_average_precision(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rows, n = 3, 40
    s = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    y = (torch.rand(rows, n, generator=gen) < 0.3).to(torch.float64)
    y[:, 0] = 1.0  # at least one positive and one negative per row
    y[:, 1] = 0.0
    for b in range(rows):
        ap = average_precision_score(y[b].numpy(), s[b].numpy())
        step_loss = reference_loss(s[b], y[b], weights=y[b], surrogate=_step)
        assert float(step_loss) == pytest.approx(1.0 - ap, abs=1e-12)
        # phi_tau >= step pointwise, so the trained (Huber) loss upper-bounds 1 - AP.
        huber = ContinuousAPLoss()(scores=s[b], targets=y[b], weights=y[b])
        assert float(huber) >= 1.0 - ap - 1e-12


@pytest.mark.parametrize("method", ["dense", "fast"])
def test_invariant_to_permuting_the_list(method: str) -> None:
    s, t = random_lists((64,), ties=True, seed=5)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    loss_fn = ContinuousAPLoss(method=method)
    value, grad = value_and_grad(loss_fn, s, targets=t)
    value_p, grad_p = value_and_grad(loss_fn, s[perm], targets=t[perm])
    torch.testing.assert_close(value_p, value, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad_p, grad[perm], rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("method", ["dense", "fast"])
def test_zero_when_ranked_like_targets_with_margin(method: str) -> None:
    t = torch.rand(50, dtype=torch.float64)
    rank = torch.argsort(torch.argsort(t)).to(torch.float64)
    s = rank * TAU  # same order as t, neighbouring scores exactly tau apart
    value, grad = value_and_grad(ContinuousAPLoss(method=method), s, targets=t)
    assert float(value) == 0.0
    assert float(grad.abs().max()) == 0.0
    # Shrinking the margin below tau makes the loss positive.
    value_small, _ = value_and_grad(ContinuousAPLoss(method=method), s * 0.5, targets=t)
    assert float(value_small) > 0.0


def test_gradient_moves_a_misranked_pair_the_right_way() -> None:
    t = torch.tensor([0.9, 0.1], dtype=torch.float64)
    s = torch.tensor([0.0, 0.3], dtype=torch.float64)  # higher target scored lower
    value, grad = value_and_grad(ContinuousAPLoss(), s, targets=t)
    assert float(value) > 0
    assert float(grad[0]) < 0 < float(grad[1])  # descent raises s_0 and lowers s_1


@pytest.mark.parametrize("method", ["dense", "fast"])
def test_gradient_step_lowers_loss_and_fixes_misranked_pairs(method: str) -> None:
    s, t = random_lists((200,), ties=False, seed=9)
    loss_fn = ContinuousAPLoss(method=method)
    value, grad = value_and_grad(loss_fn, s, targets=t)
    s_new = s - 0.05 * grad / grad.norm()
    value_new, _ = value_and_grad(loss_fn, s_new, targets=t)
    assert float(value_new) < float(value)
    # Pairs ordered against the targets move towards the targets' order on average.
    higher = t[:, None] > t[None, :]
    misranked = higher & (s[:, None] < s[None, :])
    gap_before = (s[:, None] - s[None, :])[misranked]
    gap_after = (s_new[:, None] - s_new[None, :])[misranked]
    assert float((gap_after - gap_before).mean()) > 0


@pytest.mark.parametrize("method", ["dense", "fast"])
def test_batched_rows_are_independent_lists(method: str) -> None:
    s, t = random_lists((3, 30), ties=False, seed=4)
    loss_fn = ContinuousAPLoss(method=method)
    batched = loss_fn(scores=s, targets=t)
    # Weighted mean over all anchors of all rows == per-row losses combined by weight.
    w = (t + 0.2).clamp_min(0)
    per_row = torch.stack([loss_fn(scores=s[b], targets=t[b]) for b in range(3)])
    combined = (per_row * w.sum(1)).sum() / w.sum()
    torch.testing.assert_close(batched, combined, rtol=1e-12, atol=1e-15)
    # Ranking across rows would differ from per-row ranking.
    flat = loss_fn(scores=s.flatten(), targets=t.flatten())
    assert not torch.allclose(flat, batched)


def test_masked_items_are_ignored_even_if_not_finite() -> None:
    s, t = random_lists((2, 20), ties=False, seed=8)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, 3] = mask[1, 7] = False
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[0, 3] = float("nan")
    t_bad[1, 7] = float("inf")
    expected = reference_loss(s, t, mask=mask)
    for method in ("dense", "fast"):
        loss_fn = ContinuousAPLoss(method=method)
        torch.testing.assert_close(
            loss_fn(scores=s_bad, targets=t_bad, mask=mask), expected
        )
        with value_checks():
            torch.testing.assert_close(
                loss_fn(scores=s_bad, targets=t_bad, mask=mask), expected
            )


@pytest.mark.parametrize("method", ["dense", "fast"])
def test_masked_rows_match_reference_values_and_gradients(method: str) -> None:
    s, t = random_lists((3, 30), ties=True, seed=9)
    mask = torch.rand(3, 30, generator=torch.Generator().manual_seed(9)) < 0.7
    mask[2] = False  # a row without valid items
    value, grad = value_and_grad(
        ContinuousAPLoss(method=method), s, targets=t, mask=mask
    )
    ref_value, ref_grad = value_and_grad(reference_loss, s, targets=t, mask=mask)
    torch.testing.assert_close(value, ref_value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["dense", "fast"])
@pytest.mark.parametrize("masked", [False, True])
def test_no_host_synchronisation(
    method: str, masked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On the CPU the fast path may count the distinct targets (free there); the
    # accelerator path bounds the levels by the list length instead: force it.
    fast = _ranking_ops.fast_negatives_and_positives

    def bounded_fast(
        scores: Tensor,
        targets: Tensor,
        row: Tensor,
        tau: float,
        surrogate: str = "huber",
        row_length: None = None,
    ) -> tuple[Tensor, Tensor]:
        return fast(
            scores, targets, row, tau, surrogate=surrogate, row_length=scores.shape[0]
        )

    monkeypatch.setattr(cap, "fast_negatives_and_positives", bounded_fast)
    s, t = random_lists((2, 40), ties=True, seed=10)
    s = s.float().requires_grad_(True)
    mask = torch.arange(40).expand(2, 40) % 3 > 0 if masked else None
    loss_fn = ContinuousAPLoss(method=method)
    with forbid_host_sync():
        loss_fn(scores=s, targets=t.float(), mask=mask).backward()
        # Zero weights everywhere: the zero loss comes from masking arithmetic.
        loss_fn(scores=s, targets=t.float(), weights=torch.zeros(2, 40)).backward()


def test_fast_path_with_level_bound_matches_counted_levels() -> None:
    s, t = random_lists((300,), ties=True, seed=11)  # 7 distinct targets
    row = (torch.arange(300) >= 100).long()
    s_counted = s.clone().requires_grad_(True)
    neg, pos = _ranking_ops.fast_negatives_and_positives(s_counted, t, row, TAU)
    neg.sum().backward()
    s_bounded = s.clone().requires_grad_(True)
    with forbid_host_sync():
        neg_b, pos_b = _ranking_ops.fast_negatives_and_positives(
            s_bounded, t, row, TAU, row_length=200
        )
        neg_b.sum().backward()
    torch.testing.assert_close(neg_b, neg, rtol=1e-12, atol=1e-12)
    assert torch.equal(pos_b, pos)
    assert s_counted.grad is not None and s_bounded.grad is not None
    torch.testing.assert_close(s_bounded.grad, s_counted.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["dense", "fast"])
@pytest.mark.parametrize(
    "case", ["empty", "all_masked", "zero_weights", "targets_below_offset"]
)
def test_no_valid_anchor_gives_zero_connected_to_graph(method: str, case: str) -> None:
    n = 0 if case == "empty" else 10
    s = torch.randn(n, requires_grad=True)
    t = torch.rand(n)
    kwargs: dict[str, Tensor] = {}
    if case == "all_masked":
        kwargs["mask"] = torch.zeros(n, dtype=torch.bool)
    if case == "zero_weights":
        kwargs["weights"] = torch.zeros(n)
    if case == "targets_below_offset":
        t = t - 2.0
    loss = ContinuousAPLoss(method=method)(scores=s, targets=t, **kwargs)
    assert loss.shape == torch.Size([])
    assert float(loss.detach()) == 0.0
    assert loss.requires_grad
    loss.backward()
    assert s.grad is not None and float(s.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("method", ["dense", "fast"])
def test_weights_are_a_weighted_mean(method: str) -> None:
    """Scaling all weights (e.g. to a total below 1) leaves the loss unchanged."""
    s, t = random_lists((2, 12), ties=False, seed=15)
    weights = torch.rand(2, 12, generator=torch.Generator().manual_seed(0)).double()
    loss_fn = ContinuousAPLoss(method=method)
    expected = reference_loss(s, t, weights=weights)
    for scale in (1.0, 1e-3):
        value = loss_fn(scores=s, targets=t, weights=weights * scale)
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=0.0)


def test_weights_are_cast_to_the_compute_dtype() -> None:
    s, t = random_lists((3, 40), ties=False, seed=20)
    weights = torch.rand(3, 40, generator=torch.Generator().manual_seed(3))
    loss_fn = ContinuousAPLoss()
    value = loss_fn(scores=s, targets=t, weights=weights)  # float32 weights
    expected = loss_fn(scores=s, targets=t, weights=weights.double())
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, expected, rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("method", ["dense", "fast"])
def test_nan_weight_of_a_valid_item_counts_as_zero(method: str) -> None:
    s, t = random_lists((10,), ties=False, seed=16)
    weights = torch.rand(10, generator=torch.Generator().manual_seed(1)).double()
    bad = weights.clone()
    bad[4] = float("nan")
    weights[4] = 0.0
    value = ContinuousAPLoss(method=method)(scores=s, targets=t, weights=bad)
    torch.testing.assert_close(value, reference_loss(s, t, weights=weights))


def test_value_checks_accept_zero_and_small_weights() -> None:
    s, t = random_lists((2, 10), ties=False, seed=17)
    weights = torch.rand(2, 10, generator=torch.Generator().manual_seed(2)).double()
    weights[:, ::3] = 0.0
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 5] = False
    weights[1, 5] = -1.0  # masked: not checked
    with value_checks():
        value = ContinuousAPLoss()(scores=s, targets=t, weights=weights, mask=mask)
    expected = reference_loss(s, t, weights=weights.clamp_min(0.0), mask=mask)
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize("method", ["dense", "fast"])
def test_surrogate_of_a_subclass_reaches_both_paths(method: str) -> None:
    """``_surrogate`` selects the step smoothing of the dense and the fast path."""

    def hinge(x: Tensor, tau: float) -> Tensor:
        return torch.clamp(1 - x / tau, min=0.0)

    s, t = random_lists((2, 15), ties=True, seed=18)
    loss_fn = HingeContinuousAPLoss(tau=0.7, method=method)
    value, grad = value_and_grad(loss_fn, s, targets=t)
    ref_value, ref_grad = value_and_grad(
        lambda **kw: reference_loss(tau=0.7, surrogate=hinge, **kw), s, targets=t
    )
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_autocast_bf16_computes_in_float32() -> None:
    s, t = random_lists((500,), ties=False, seed=12)
    s16, t16 = s.to(torch.bfloat16), t.to(torch.bfloat16)
    expected = ContinuousAPLoss()(scores=s16.float(), targets=t16.float())
    leaf = s16.clone().requires_grad_(True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = ContinuousAPLoss()(scores=leaf, targets=t16)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    loss.backward()
    assert leaf.grad is not None and leaf.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(500,), (2, 400)])  # dense / fast under "auto"
def test_bfloat16_scores_are_ranked_in_float32(shape: tuple[int, ...]) -> None:
    s, t = random_lists(shape, ties=False, seed=12)
    s16, t32 = s.to(torch.bfloat16), t.float()
    # A small kappa makes l_i ~ kappa NEG_i / POS_i: the loss follows NEG closely, so
    # score differences rounded to bfloat16 would show.
    loss_fn = ContinuousAPLoss(kappa=1e-3)
    value = loss_fn(scores=s16, targets=t32)
    expected = loss_fn(scores=s16.float(), targets=t32)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("method", ["dense", "fast"])
def test_float32_inputs_match_float64_dense_reference(method: str) -> None:
    s, t = random_lists((1100,), ties=False, seed=13)
    s32, t32 = s.float(), t.float()
    # The reference: the dense path in float64 on the same (float32-rounded) values.
    ref_value, ref_grad = value_and_grad(
        ContinuousAPLoss(method="dense"), s32.double(), targets=t32.double()
    )
    value, grad = value_and_grad(ContinuousAPLoss(method=method), s32, targets=t32)
    assert value.dtype == grad.dtype == torch.float32
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(
        grad.double(), ref_grad, rtol=1e-3, atol=1e-5 * float(ref_grad.abs().max())
    )


def test_float32_inputs_are_exact_on_anchors_with_few_negatives() -> None:
    """Anchors with a tiny NEG lose it to cancellation if the sums run in float32."""
    s, t = random_lists((1100,), ties=False, seed=13)
    s32, t32 = s.float(), t.float()
    valid = torch.ones(1, 1100, dtype=torch.bool)
    neg, _ = _ranking_ops.dense_negatives_and_positives(
        s32.double()[None], t32.double()[None], valid, TAU
    )
    positive = torch.nonzero(neg[0] > 0).squeeze(1)
    smallest = positive[neg[0, positive].argsort()[:10]]
    weights = torch.zeros(1100)
    weights[smallest] = 1.0
    # Only those 10 anchors weigh: the loss is the mean of their l_i.
    expected = ContinuousAPLoss(method="dense")(
        scores=s32.double(), targets=t32.double(), weights=weights.double()
    )
    value = ContinuousAPLoss(method="fast")(scores=s32, targets=t32, weights=weights)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=0.0)


def test_float32_scores_crowded_near_one_keep_float64_accuracy() -> None:
    """Scores crowded near 1 (cosine similarities), a small margin: float32 inputs.

    The fast path's moment sums of ``s``, ``s^2``, ``t s`` cancel by orders of
    magnitude there and must run in float64 (scores and targets).
    """
    gen = torch.Generator().manual_seed(19)
    s = (0.9 + 0.02 * torch.randn(2, 600, generator=gen)).float()
    t = torch.rand(2, 600, generator=gen).float()
    loss_fn = ContinuousAPLoss(tau=0.05)
    assert not loss_fn.uses_dense(s)
    ref_value, ref_grad = value_and_grad(
        ContinuousAPLoss(tau=0.05, method="dense"), s.double(), targets=t.double()
    )
    value, grad = value_and_grad(loss_fn, s, targets=t)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(
        grad.double(), ref_grad, rtol=0.0, atol=1e-5 * float(ref_grad.abs().max())
    )


def test_cuda_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    s, t = random_lists((2, 3000), ties=True, seed=14)
    for method in ("dense", "fast"):
        loss_fn = ContinuousAPLoss(method=method)
        cpu_value, cpu_grad = value_and_grad(loss_fn, s, targets=t)
        gpu_value, gpu_grad = value_and_grad(loss_fn, s.cuda(), targets=t.cuda())
        torch.testing.assert_close(gpu_value.cpu(), cpu_value, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(gpu_grad.cpu(), cpu_grad, rtol=1e-6, atol=1e-9)


class TestBadInput:
    def test_mismatched_targets_shape(self) -> None:
        with pytest.raises(ValueError, match=r"targets .*shape.*\(5,\).*\(4,\)"):
            ContinuousAPLoss()(scores=torch.randn(5), targets=torch.randn(4))

    def test_mismatched_weights_shape(self) -> None:
        with pytest.raises(ValueError, match=r"weights .*\(2, 5\).*\(5,\)"):
            ContinuousAPLoss()(
                scores=torch.randn(2, 5),
                targets=torch.randn(2, 5),
                weights=torch.rand(5),
            )

    def test_mismatched_mask_shape(self) -> None:
        with pytest.raises(ValueError, match=r"mask .*\(2, 5\).*\(2, 4\)"):
            ContinuousAPLoss()(
                scores=torch.randn(2, 5),
                targets=torch.randn(2, 5),
                mask=torch.ones(2, 4, dtype=torch.bool),
            )

    def test_non_bool_mask(self) -> None:
        with pytest.raises(ValueError, match="mask must be a bool"):
            ContinuousAPLoss()(
                scores=torch.randn(5), targets=torch.randn(5), mask=torch.ones(5)
            )

    def test_wrong_rank(self) -> None:
        with pytest.raises(ValueError, match=r"scores .*\(2, 3, 4\)"):
            ContinuousAPLoss()(
                scores=torch.randn(2, 3, 4), targets=torch.randn(2, 3, 4)
            )

    def test_integer_scores(self) -> None:
        with pytest.raises(ValueError, match="scores must be a floating"):
            ContinuousAPLoss()(
                scores=torch.ones(3, dtype=torch.long), targets=torch.ones(3)
            )

    @pytest.mark.parametrize("name", ["scores", "targets", "weights"])
    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
    def test_non_finite(self, name: str, bad: float) -> None:
        inputs = {
            "scores": torch.randn(6),
            "targets": torch.rand(6),
            "weights": torch.rand(6),
        }
        inputs[name][2] = bad
        with (
            value_checks(),
            pytest.raises(
                ValueError, match=rf"{name} of shape \(6,\) contains 1 non-finite"
            ),
        ):
            ContinuousAPLoss()(**inputs)
        # Off by default (the check reads values on the host): no error.
        ContinuousAPLoss()(**inputs)

    @pytest.mark.parametrize("name", ["targets", "weights", "mask"])
    def test_not_a_tensor(self, name: str) -> None:
        inputs: dict[str, object] = {
            "scores": torch.randn(3),
            "targets": torch.rand(3),
        }
        inputs[name] = [0.0, 1.0, 1.0]
        with pytest.raises(
            ValueError,
            match=rf"{name} must have the same shape as scores \(3,\), got <class 'list'>",
        ):
            ContinuousAPLoss()(**inputs)  # type: ignore[arg-type]

    def test_targets_requiring_grad(self) -> None:
        with pytest.raises(ValueError, match="targets must not require grad"):
            ContinuousAPLoss()(
                scores=torch.randn(4), targets=torch.rand(4, requires_grad=True)
            )

    def test_negative_weights(self) -> None:
        inputs = dict(
            scores=torch.randn(4),
            targets=torch.rand(4),
            weights=torch.tensor([1.0, -0.5, 1.0, 1.0]),
        )
        with (
            value_checks(),
            pytest.raises(ValueError, match="weights of shape .* non-negative"),
        ):
            ContinuousAPLoss()(**inputs)
        with value_checks(False):
            ContinuousAPLoss()(**inputs)

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"tau": 0.0}, "tau"),
            ({"tau": -1.0}, "tau"),
            ({"tau": float("inf")}, "tau"),
            ({"kappa": 0.0}, "kappa"),
            ({"weight_offset": float("nan")}, "weight_offset"),
            ({"method": "sorted"}, "method"),
            ({"dense_max_pairs": -1}, "dense_max_pairs"),
        ],
    )
    def test_constructor_validation(
        self, kwargs: dict[str, object], match: str
    ) -> None:
        with pytest.raises(ValueError, match=match):
            ContinuousAPLoss(**kwargs)  # type: ignore[arg-type]
