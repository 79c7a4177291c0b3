from __future__ import annotations

import functools
import math
from collections.abc import Callable

import pytest
import torch
from ranking_lists import random_lists, value_and_grad
from torch import Tensor, nn

from lightly_cotap.loss import (
    BinaryAPLoss,
    ContinuousAPLoss,
    CoTAPLoss,
    HingeContinuousAPLoss,
    SimilarityKLLoss,
    SimilarityMSELoss,
    STEGOCorrelationLoss,
    TopKInfoNCELoss,
    _ranking_ops,
    value_checks,
)

# ----------------------------------------------------------------------------------
# float64 references written from the formulas, item by item.
# ----------------------------------------------------------------------------------

Reference = Callable[..., Tensor]


def _rows(
    scores: Tensor, targets: Tensor, weights: Tensor | None, mask: Tensor | None
) -> list[tuple[Tensor, list[float], list[float]]]:
    """Per row: the valid scores, targets and weights (default 1)."""
    s2 = scores if scores.dim() == 2 else scores[None]
    t2 = targets if targets.dim() == 2 else targets[None]
    w2 = None if weights is None else (weights if weights.dim() == 2 else weights[None])
    m2 = None if mask is None else (mask if mask.dim() == 2 else mask[None])
    rows = []
    for b in range(s2.shape[0]):
        keep = [i for i in range(s2.shape[1]) if m2 is None or bool(m2[b, i])]
        rows.append(
            (
                s2[b, keep],
                [float(t2[b, i]) for i in keep],
                [1.0 if w2 is None else float(w2[b, i]) for i in keep],
            )
        )
    return rows


def _zero(scores: Tensor) -> Tensor:
    return scores.sum() * 0.0


def mse_reference(scores, targets, weights=None, mask=None):  # type: ignore[no-untyped-def]
    num, den = _zero(scores), 0.0
    for s, t, w in _rows(scores, targets, weights, mask):
        for i in range(len(t)):
            num = num + w[i] * (s[i] - t[i]) ** 2
            den += w[i]
    return num / den if den > 0 else _zero(scores)


def kl_reference(scores, targets, weights=None, mask=None, temp=0.1, teacher_temp=0.1):  # type: ignore[no-untyped-def]
    num, den = _zero(scores), 0.0
    for s, t, w in _rows(scores, targets, weights, mask):
        if not t:
            continue
        z_t = sum(math.exp(x / teacher_temp) for x in t)
        p = [math.exp(x / teacher_temp) / z_t for x in t]
        log_z_s = torch.logsumexp(s / temp, dim=0)
        kl = _zero(scores)
        for j in range(len(t)):
            kl = kl + p[j] * (math.log(p[j]) - (s[j] / temp - log_z_s))
        num = num + sum(w) * kl
        den += sum(w)
    return num / den if den > 0 else _zero(scores)


def stego_reference(scores, targets, weights=None, mask=None, shift=0.5, clamp=True):  # type: ignore[no-untyped-def]
    num, den = _zero(scores), 0.0
    for s, t, w in _rows(scores, targets, weights, mask):
        for i in range(len(t)):
            student = torch.clamp(s[i], min=0.0) if clamp else s[i]
            num = num - w[i] * (t[i] - shift) * student
            den += w[i]
    return num / den if den > 0 else _zero(scores)


def infonce_reference(scores, targets, weights=None, mask=None, k=3, temp=0.1):  # type: ignore[no-untyped-def]
    num, den = _zero(scores), 0.0
    for s, t, w in _rows(scores, targets, weights, mask):
        # Highest targets first, the lower index first among equal targets.
        order = sorted(range(len(t)), key=lambda i: (-t[i], i))
        positives = set(order[:k])
        negatives = [j for j in range(len(t)) if j not in positives]
        for p in positives:
            denominator = torch.exp(s[p] / temp) + sum(
                (torch.exp(s[j] / temp) for j in negatives), _zero(scores)
            )
            num = num - w[p] * torch.log(torch.exp(s[p] / temp) / denominator)
            den += w[p]
    return num / den if den > 0 else _zero(scores)


def _phi_huber(x: Tensor, tau: float) -> Tensor:
    if x < 0:
        return 1 - 2 * x / tau
    if x < tau:
        return (1 - x / tau) ** 2
    return x * 0.0


def _phi_hinge(x: Tensor, tau: float) -> Tensor:
    return (tau - x) / tau if x < tau else x * 0.0


def binary_ap_reference(  # type: ignore[no-untyped-def]
    scores, targets, weights=None, mask=None, threshold=0.5, tau=0.5, kappa=1.0
):
    """Smoothed 1 - precision at every positive, averaged with the weights."""
    num, den = _zero(scores), 0.0
    for s, t, w in _rows(scores, targets, weights, mask):
        y = [x >= threshold for x in t]
        for i in range(len(t)):
            if not y[i]:
                continue
            neg = sum(
                (_phi_huber(s[i] - s[j], tau) for j in range(len(t)) if not y[j]),
                _zero(scores),
            )
            pos = sum(1 for j in range(len(t)) if y[j] and s[j] >= s[i])
            u = kappa * neg / pos
            num = num + w[i] * u / (1 + u)
            den += w[i]
    return num / den if den > 0 else _zero(scores)


def hinge_ap_reference(  # type: ignore[no-untyped-def]
    scores, targets, weights=None, mask=None, tau=0.5, kappa=1.0, offset=-0.2
):
    """ContinuousAPLoss's formula with the hinge max(0, tau + s_j - s_i) / tau."""
    assert weights is None
    num, den = _zero(scores), 0.0
    for s, t, _ in _rows(scores, targets, None, mask):
        for i in range(len(t)):
            w_i = max(t[i] - offset, 0.0)
            neg, pos = _zero(scores), 0
            for j in range(len(t)):
                if t[i] > t[j]:
                    neg = neg + (t[i] - t[j]) * _phi_hinge(s[i] - s[j], tau)
                if t[j] >= t[i] and s[j] >= s[i]:
                    pos += 1
            u = kappa * neg / pos
            num = num + w_i * u / (1 + u)
            den += w_i
    return num / den if den > 0 else _zero(scores)


CASES: dict[str, tuple[Callable[[], nn.Module], Reference]] = {
    "mse": (SimilarityMSELoss, mse_reference),
    "kl": (lambda: SimilarityKLLoss(temperature=0.1), kl_reference),
    "kl_two_temperatures": (
        lambda: SimilarityKLLoss(temperature=0.2, teacher_temperature=0.05),
        lambda **kw: kl_reference(temp=0.2, teacher_temp=0.05, **kw),
    ),
    "stego": (
        lambda: STEGOCorrelationLoss(shift=0.3),
        lambda **kw: stego_reference(shift=0.3, **kw),
    ),
    "stego_unclamped": (
        lambda: STEGOCorrelationLoss(shift=0.3, clamp_scores=False),
        lambda **kw: stego_reference(shift=0.3, clamp=False, **kw),
    ),
    "infonce": (lambda: TopKInfoNCELoss(top_k=3), infonce_reference),
    "infonce_t05": (
        lambda: TopKInfoNCELoss(top_k=5, temperature=0.5),
        lambda **kw: infonce_reference(k=5, temp=0.5, **kw),
    ),
    "binary_ap": (
        lambda: BinaryAPLoss(threshold=0.2),
        lambda **kw: binary_ap_reference(threshold=0.2, **kw),
    ),
    "binary_ap_fast": (
        lambda: BinaryAPLoss(threshold=0.2, tau=0.3, kappa=2.0, method="fast"),
        lambda **kw: binary_ap_reference(threshold=0.2, tau=0.3, kappa=2.0, **kw),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shape", [(19,), (3, 13)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("use_weights", [False, True])
def test_matches_reference(
    case: str, shape: tuple[int, ...], ties: bool, use_mask: bool, use_weights: bool
) -> None:
    make, reference = CASES[case]
    s, t = random_lists(shape, ties=ties, seed=len(case) + 7 * len(shape))
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(shape, generator=gen) > 0.3 if use_mask else None
    weights = (
        torch.rand(shape, generator=gen, dtype=torch.float64) if use_weights else None
    )
    value, grad = value_and_grad(
        make(), s, allow_unused=True, targets=t, weights=weights, mask=mask
    )
    ref_value, ref_grad = value_and_grad(
        reference, s, allow_unused=True, targets=t, weights=weights, mask=mask
    )
    assert value.dtype == torch.float64
    assert grad.abs().sum() > 0
    torch.testing.assert_close(value, ref_value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["dense", "fast"])
@pytest.mark.parametrize("shape", [(23,), (3, 17)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
def test_hinge_matches_reference(
    method: str, shape: tuple[int, ...], ties: bool, use_mask: bool
) -> None:
    s, t = random_lists(shape, ties=ties, seed=11 + len(shape))
    mask = (
        torch.rand(shape, generator=torch.Generator().manual_seed(2)) > 0.25
        if use_mask
        else None
    )
    for tau, kappa, offset in ((0.5, 1.0, -0.2), (0.3, 2.0, 0.0)):
        loss_fn = HingeContinuousAPLoss(
            tau=tau, kappa=kappa, weight_offset=offset, method=method
        )
        value, grad = value_and_grad(
            loss_fn, s, allow_unused=True, targets=t, mask=mask
        )
        ref_value, ref_grad = value_and_grad(
            functools.partial(hinge_ap_reference, tau=tau, kappa=kappa, offset=offset),
            s,
            allow_unused=True,
            targets=t,
            mask=mask,
        )
        torch.testing.assert_close(value, ref_value, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_hinge_differs_from_huber_and_fast_path_on_long_lists() -> None:
    s, t = random_lists((3000,), ties=True, seed=5)
    hinge_dense = value_and_grad(
        HingeContinuousAPLoss(method="dense"), s, allow_unused=True, targets=t
    )
    hinge_fast = value_and_grad(
        HingeContinuousAPLoss(method="fast"), s, allow_unused=True, targets=t
    )
    huber = value_and_grad(
        ContinuousAPLoss(method="fast"), s, allow_unused=True, targets=t
    )
    torch.testing.assert_close(hinge_fast[0], hinge_dense[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(hinge_fast[1], hinge_dense[1], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(hinge_fast[0], huber[0])


def test_binary_ap_is_continuous_ap_on_binarised_targets_with_positive_anchors() -> (
    None
):
    s, t = random_lists((2, 30), ties=False, seed=6)
    w = torch.rand(2, 30, dtype=torch.float64)
    labels = (t >= 0.1).double()
    expected = ContinuousAPLoss()(scores=s, targets=labels, weights=w * labels)
    value = BinaryAPLoss(threshold=0.1)(scores=s, targets=t, weights=w)
    torch.testing.assert_close(value, expected, rtol=0, atol=0)


def test_binary_ap_with_step_is_one_minus_average_precision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sklearn.metrics import average_precision_score

    def step(x: Tensor, tau: float) -> Tensor:
        return (x <= 0).to(x.dtype)

    monkeypatch.setitem(_ranking_ops.SURROGATES, "huber", step)
    s, t = random_lists((40,), ties=False, seed=8)
    value = BinaryAPLoss(threshold=0.0, method="dense")(scores=s, targets=t)
    ap = average_precision_score((t >= 0).numpy(), s.numpy())
    assert float(value) == pytest.approx(1 - ap, abs=1e-12)


def test_infonce_top_k_breaks_ties_towards_lower_index() -> None:
    s = torch.tensor([0.1, 0.9, 0.3, -0.2], dtype=torch.float64)
    t = torch.tensor([0.5, 0.5, 0.5, 0.1], dtype=torch.float64)
    value = TopKInfoNCELoss(top_k=2, temperature=1.0)(scores=s, targets=t)
    # Positives: items 0 and 1; negatives: items 2 and 3.
    neg = math.exp(0.3) + math.exp(-0.2)
    expected = 0.5 * (
        math.log(1 + neg / math.exp(0.1)) + math.log(1 + neg / math.exp(0.9))
    )
    assert float(value) == pytest.approx(expected, abs=1e-12)


def test_kl_is_zero_when_student_matches_teacher_distribution() -> None:
    t = torch.rand(2, 10, dtype=torch.float64)
    loss = SimilarityKLLoss(temperature=0.2, teacher_temperature=0.1)(
        scores=2 * t, targets=t
    )
    assert float(loss) == pytest.approx(0.0, abs=1e-12)


ALL: dict[str, Callable[[], nn.Module]] = {
    "mse": SimilarityMSELoss,
    "kl": SimilarityKLLoss,
    "stego": STEGOCorrelationLoss,
    "infonce": lambda: TopKInfoNCELoss(top_k=2),
    "binary_ap": BinaryAPLoss,
    "hinge_ap": HingeContinuousAPLoss,
}


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("case", ["empty", "all_masked", "zero_weights"])
def test_nothing_to_score_gives_zero_connected_to_graph(name: str, case: str) -> None:
    n = 0 if case == "empty" else 6
    s = torch.randn(n, requires_grad=True)
    t = torch.rand(n)
    kwargs: dict[str, Tensor] = {}
    if case == "all_masked":
        kwargs["mask"] = torch.zeros(n, dtype=torch.bool)
    if case == "zero_weights":
        kwargs["weights"] = torch.zeros(n)
    loss = ALL[name]()(scores=s, targets=t, **kwargs)
    assert loss.shape == torch.Size([]) and float(loss.detach()) == 0.0
    assert loss.requires_grad
    loss.backward()
    assert s.grad is not None and float(s.grad.abs().sum()) == 0.0


def test_degenerate_lists() -> None:
    s = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    t = torch.rand(2, 4, dtype=torch.float64)
    # Every valid item a positive: no negatives, every l_p = 0.
    assert float(TopKInfoNCELoss(top_k=4)(scores=s, targets=t)) == 0.0
    # One valid item per row: the distributions are equal.
    one = torch.zeros(2, 4, dtype=torch.bool)
    one[:, 1] = True
    assert float(SimilarityKLLoss()(scores=s, targets=t, mask=one)) == 0.0
    # A fully masked row next to a valid one does not change the result.
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1] = False
    for make in ALL.values():
        loss_fn = make()
        both = loss_fn(scores=s, targets=t, mask=mask)
        first = loss_fn(scores=s[0], targets=t[0])
        torch.testing.assert_close(both, first)


@pytest.mark.parametrize("name", sorted(ALL))
def test_masked_items_may_hold_nan(name: str) -> None:
    s, t = random_lists((2, 9), ties=False, seed=9)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 2] = mask[1, 5] = False
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[0, 2] = float("nan")
    t_bad[1, 5] = float("inf")
    loss_fn = ALL[name]()
    expected = loss_fn(scores=s, targets=t, mask=mask)
    value = loss_fn(scores=s_bad, targets=t_bad, mask=mask)
    assert torch.isfinite(value)
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize("name", sorted(ALL))
class TestBadInput:
    def test_targets_shape(self, name: str) -> None:
        with pytest.raises(ValueError, match=r"targets .*\(5,\).*\(4,\)"):
            ALL[name]()(scores=torch.randn(5), targets=torch.rand(4))

    def test_weights_shape(self, name: str) -> None:
        with pytest.raises(ValueError, match=r"weights .*\(2, 5\).*\(5,\)"):
            ALL[name]()(
                scores=torch.randn(2, 5),
                targets=torch.rand(2, 5),
                weights=torch.rand(5),
            )

    def test_mask_shape(self, name: str) -> None:
        with pytest.raises(ValueError, match=r"mask .*\(2, 5\).*\(2, 4\)"):
            ALL[name]()(
                scores=torch.randn(2, 5),
                targets=torch.rand(2, 5),
                mask=torch.ones(2, 4, dtype=torch.bool),
            )

    def test_rank(self, name: str) -> None:
        with pytest.raises(ValueError, match=r"scores .*\(2, 3, 4\)"):
            ALL[name]()(scores=torch.randn(2, 3, 4), targets=torch.rand(2, 3, 4))

    def test_non_finite(self, name: str) -> None:
        t = torch.rand(6)
        t[2] = float("nan")
        # Value checks are opt-in (they read values from the device).
        ALL[name]()(scores=torch.randn(6), targets=t)
        with (
            value_checks(),
            pytest.raises(
                ValueError, match=r"targets of shape \(6,\) contains 1 non-finite"
            ),
        ):
            ALL[name]()(scores=torch.randn(6), targets=t)

    def test_targets_requiring_grad(self, name: str) -> None:
        with pytest.raises(ValueError, match="targets must not require grad"):
            ALL[name]()(
                scores=torch.randn(4), targets=torch.rand(4, requires_grad=True)
            )

    def test_negative_weights(self, name: str) -> None:
        with value_checks(), pytest.raises(ValueError, match="non-negative"):
            ALL[name]()(
                scores=torch.randn(3),
                targets=torch.rand(3),
                weights=torch.tensor([1.0, -1.0, 1.0]),
            )


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SimilarityKLLoss(temperature=0.0), "temperature"),
        (lambda: SimilarityKLLoss(teacher_temperature=-1.0), "teacher_temperature"),
        (lambda: STEGOCorrelationLoss(shift=math.inf), "shift"),
        (lambda: TopKInfoNCELoss(top_k=0), "top_k"),
        (lambda: TopKInfoNCELoss(top_k=2, temperature=math.nan), "temperature"),
        (lambda: BinaryAPLoss(threshold=math.nan), "threshold"),
        (lambda: BinaryAPLoss(tau=0.0), "tau"),
        (lambda: HingeContinuousAPLoss(kappa=-1.0), "kappa"),
    ],
)
def test_constructor_validation(make: Callable[[], nn.Module], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name", sorted(ALL))
def test_plugs_into_cotap_loss(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    teacher_x, teacher_pos = (
        torch.randn(3, 1, 4, 4, 4, generator=gen) for _ in range(2)
    )
    student_x = (
        teacher_x + torch.randn(teacher_x.shape, generator=gen)
    ).requires_grad_()
    student_pos = teacher_pos + torch.randn(teacher_pos.shape, generator=gen)
    fg = torch.rand(3, 1, 4, 4, generator=gen)
    loss = CoTAPLoss(pool_sizes=(4,), top_k=3, num_negatives=1, criterion=ALL[name]())(
        student_x=student_x,
        student_pos=student_pos,
        teacher_x=teacher_x,
        teacher_pos=teacher_pos,
        fg_mask_x=fg,
        fg_mask_pos=fg,
    )
    assert torch.isfinite(loss)
    loss.backward()
    assert student_x.grad is not None and student_x.grad.abs().sum() > 0
