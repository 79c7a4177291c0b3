"""The ranking terms NEG / POS of the continuous-target AP loss, item by item.

Both implementations (dense and sort-based) are checked against a float64 pairwise
reference written from the definitions, for both surrogates, several independent
lists (rows) given in an interleaved order, ties in scores and targets, and the
level bound of the sort-based path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from lightly_cotap.loss import _ranking_ops


def _huber(x: Tensor, tau: float) -> Tensor:
    """phi_tau: 1 - 2x/tau below 0, (1 - x/tau)^2 on [0, tau), 0 from tau on."""
    return torch.where(
        x < 0,
        1 - 2 * x / tau,
        torch.where(x < tau, (1 - x / tau) ** 2, torch.zeros_like(x)),
    )


def _hinge(x: Tensor, tau: float) -> Tensor:
    """max(0, 1 - x/tau)."""
    return torch.clamp(1 - x / tau, min=0.0)


REFERENCE_SURROGATES = {"huber": _huber, "hinge": _hinge}


def reference_terms(
    s: Tensor, t: Tensor, row: Tensor, tau: float, surrogate: str
) -> tuple[Tensor, Tensor]:
    """NEG_i = sum_j (t_i - t_j)_+ phi(s_i - s_j), POS_i = #{t_j >= t_i, s_j >= s_i}.

    Pairs only within one row; float64 pairwise matrices, differentiable in ``s``.
    """
    same_row = row[:, None] == row[None, :]
    gap = (t[:, None] - t[None, :]).clamp_min(0.0)
    phi = REFERENCE_SURROGATES[surrogate](s[:, None] - s[None, :], tau)
    neg = torch.where(same_row, gap * phi, torch.zeros_like(phi)).sum(dim=1)
    counted = (t[None, :] >= t[:, None]) & (s[None, :] >= s[:, None]) & same_row
    return neg, counted.sum(dim=1).to(s.dtype)


def _lists(
    sizes: tuple[int, ...], ties: bool, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Scores, targets and row ids of independent lists, items interleaved."""
    gen = torch.Generator().manual_seed(seed)
    row = torch.cat([torch.full((n,), r) for r, n in enumerate(sizes)])
    row = row[torch.randperm(row.numel(), generator=gen)]
    s = torch.randn(row.numel(), generator=gen, dtype=torch.float64) * 0.6
    t = torch.rand(row.numel(), generator=gen, dtype=torch.float64) * 2 - 1
    if ties:
        # Score steps of 1/8 also put pairs exactly on the margins 0.25 and 0.5.
        s = (s * 8).round() / 8
        t = (t * 3).round() / 3
    return s, t, row


def _terms_and_grad(
    fn: Callable[..., tuple[Tensor, Tensor]],
    s: Tensor,
    t: Tensor,
    row: Tensor,
    upstream: Tensor,
    **kwargs: object,
) -> tuple[Tensor, Tensor, Tensor]:
    """NEG, POS (no gradient) and d(sum_i upstream_i NEG_i)/ds."""
    leaf = s.clone().requires_grad_(True)
    neg, pos = fn(leaf, t, row, **kwargs)
    assert not pos.requires_grad
    (grad,) = torch.autograd.grad((upstream * neg).sum(), leaf)
    return neg.detach(), pos, grad


@pytest.mark.parametrize("surrogate", ["huber", "hinge"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("tau", [0.25, 0.5, 2.0])
def test_fast_terms_match_reference(surrogate: str, ties: bool, tau: float) -> None:
    # Rows of 17 (distinct targets one past a power of two), 40 and 9 items.
    s, t, row = _lists((17, 40, 9), ties=ties, seed=int(tau * 8) + 2 * ties)
    upstream = torch.rand(s.shape, generator=torch.Generator().manual_seed(3)) + 0.5
    upstream = upstream.to(torch.float64)
    neg, pos, grad = _terms_and_grad(
        _ranking_ops.fast_negatives_and_positives,
        s,
        t,
        row,
        upstream,
        tau=tau,
        surrogate=surrogate,
    )
    ref_neg, ref_pos, ref_grad = _terms_and_grad(
        lambda s, t, row: reference_terms(s, t, row, tau, surrogate),
        s,
        t,
        row,
        upstream,
    )
    assert neg.dtype == pos.dtype == torch.float64
    torch.testing.assert_close(neg, ref_neg, rtol=1e-10, atol=1e-12)
    assert torch.equal(pos, ref_pos)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("surrogate", ["huber", "hinge"])
@pytest.mark.parametrize("row_length", [40, 41, 64, 100])
def test_fast_terms_with_level_bound_match_reference(
    surrogate: str, row_length: int
) -> None:
    """The bound (at least the longest row) replaces counting the distinct targets."""
    s, t, row = _lists((33, 40, 1), ties=True, seed=row_length)
    upstream = torch.linspace(0.5, 1.5, s.numel(), dtype=torch.float64)
    neg, pos, grad = _terms_and_grad(
        _ranking_ops.fast_negatives_and_positives,
        s,
        t,
        row,
        upstream,
        tau=0.5,
        surrogate=surrogate,
        row_length=row_length,
    )
    ref_neg, ref_pos, ref_grad = _terms_and_grad(
        lambda s, t, row: reference_terms(s, t, row, 0.5, surrogate),
        s,
        t,
        row,
        upstream,
    )
    torch.testing.assert_close(neg, ref_neg, rtol=1e-10, atol=1e-12)
    assert torch.equal(pos, ref_pos)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("surrogate", ["huber", "hinge"])
def test_dense_terms_match_reference(surrogate: str) -> None:
    s, t, _ = _lists((3 * 20,), ties=True, seed=5)
    s, t = s.view(3, 20), t.view(3, 20)
    valid = torch.rand(3, 20, generator=torch.Generator().manual_seed(1)) > 0.3
    upstream = torch.rand(3, 20, generator=torch.Generator().manual_seed(2)).double()
    leaf = s.clone().requires_grad_(True)
    neg, pos = _ranking_ops.dense_negatives_and_positives(
        leaf, t, valid, 0.5, surrogate=_ranking_ops.SURROGATES[surrogate]
    )
    (grad,) = torch.autograd.grad((upstream * neg).sum(), leaf)
    # The reference on the valid items only, each row its own list.
    rows = torch.arange(3)[:, None].expand(3, 20)
    leaf_ref = s.clone().requires_grad_(True)
    ref_neg, ref_pos = reference_terms(
        leaf_ref[valid], t[valid], rows[valid], 0.5, surrogate
    )
    (ref_grad,) = torch.autograd.grad((upstream[valid] * ref_neg).sum(), leaf_ref)
    torch.testing.assert_close(neg[valid], ref_neg, rtol=1e-12, atol=1e-12)
    assert torch.equal(pos[valid], ref_pos)
    # Invalid anchors take part in no pair: NEG = POS = 0, no gradient.
    assert float(neg.detach()[~valid].abs().sum()) == 0.0
    assert float(pos[~valid].abs().sum()) == 0.0
    assert not pos.requires_grad
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_surrogates_by_definition() -> None:
    tau = 0.8
    x = torch.tensor(
        [-2.0, -0.3, -1e-3, 0.0, 1e-3, 0.2, 0.4, 0.79, 0.8, 0.81, 3.0],
        dtype=torch.float64,
    )
    huber = torch.tensor(
        [
            1 - 2 * v / tau if v < 0 else ((1 - v / tau) ** 2 if v < tau else 0.0)
            for v in x.tolist()
        ],
        dtype=torch.float64,
    )
    hinge = torch.tensor(
        [max(0.0, 1 - v / tau) for v in x.tolist()], dtype=torch.float64
    )
    torch.testing.assert_close(
        _ranking_ops.huber_surrogate(x, tau), huber, rtol=1e-15, atol=1e-15
    )
    torch.testing.assert_close(
        _ranking_ops.hinge_surrogate(x, tau), hinge, rtol=1e-15, atol=1e-15
    )
    assert set(_ranking_ops.SURROGATES) == {"huber", "hinge"}
    assert _ranking_ops.SURROGATES["huber"] is _ranking_ops.huber_surrogate
    assert _ranking_ops.SURROGATES["hinge"] is _ranking_ops.hinge_surrogate


@pytest.mark.parametrize("row_length", [None, 12])
def test_target_ranks_are_dense_ranks_per_row(row_length: int | None) -> None:
    t = torch.tensor(
        [0.5, 0.1, 0.5, -0.2, 0.9, 0.1, 0.3, 0.3, 0.7], dtype=torch.float64
    )
    row = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 1])
    rank, num_levels = _ranking_ops._target_ranks(row, t, row_length)
    # Distinct targets per row: 3 in row 0, 4 in row 1, 1 in row 2; 4 fits 2 levels,
    # a bound of 12 items takes 4.
    expected_levels = 2 if row_length is None else 4
    assert num_levels == expected_levels
    in_row = torch.tensor([2, 1, 2, 0, 3, 0, 1, 0, 2])
    assert torch.equal(rank, row * 2**expected_levels + in_row)


@pytest.mark.parametrize("n, levels", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (9, 4)])
def test_number_of_levels(n: int, levels: int) -> None:
    """ceil(log2(n)) levels separate n distinct targets; a bound of n gives as many."""
    t = torch.linspace(-1, 1, n, dtype=torch.float64)
    row = torch.zeros(n, dtype=torch.long)
    assert _ranking_ops._target_ranks(row, t, None)[1] == levels
    assert _ranking_ops._target_ranks(row, t, n)[1] == levels
    assert levels == math.ceil(math.log2(n))


def test_sort_rows_then_values() -> None:
    row = torch.tensor([1, 0, 1, 0, 2, 0])
    values = torch.tensor([0.3, 0.9, -0.1, 0.2, 0.0, 0.2])
    order = _ranking_ops._sort_rows_then_values(row, values)
    # Row 0: 0.2 (item 3), 0.2 (item 5, stable), 0.9; row 1: -0.1, 0.3; row 2.
    assert order.tolist() == [3, 5, 1, 2, 0, 4]


def test_single_item_lists_have_no_negatives() -> None:
    s = torch.tensor([0.3, -0.2, 0.7], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.9, -0.5, 0.1], dtype=torch.float64)
    neg, pos = _ranking_ops.fast_negatives_and_positives(s, t, torch.arange(3), 0.5)
    assert neg.tolist() == [0.0, 0.0, 0.0]
    assert pos.tolist() == [1.0, 1.0, 1.0]
    neg.sum().backward()
    assert s.grad is not None and s.grad.tolist() == [0.0, 0.0, 0.0]


def test_fast_empty_list_keeps_the_graph() -> None:
    s = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    neg, pos = _ranking_ops.fast_negatives_and_positives(
        s, torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5
    )
    assert neg.shape == pos.shape == (0,)
    assert neg.requires_grad and not pos.requires_grad
    assert neg.dtype == torch.float64


def test_fast_unknown_surrogate() -> None:
    s, t, row = _lists((5,), ties=False, seed=0)
    with pytest.raises(ValueError, match="surrogate must be one of"):
        _ranking_ops.fast_negatives_and_positives(s, t, row, 0.5, surrogate="step")
