"""Pairwise ranking terms of the continuous-target AP loss.

For a list of student scores ``s`` and teacher targets ``t`` (one or several
independent lists, told apart by a ``row`` index) these functions compute, for
every anchor ``i``,

    NEG_i = sum_j (t_i - t_j)_+ * phi_tau(s_i - s_j)        (differentiable in s)
    POS_i = #{ j : t_j >= t_i and s_j >= s_i }              (no gradient, j = i included)

with the Huber-like surrogate ``phi_tau`` of the step ``1[s_j >= s_i]``:

    phi_tau(x) = 1 - 2x/tau      (x < 0)
               = (1 - x/tau)^2   (0 <= x < tau)
               = 0               (x >= tau)

The hinge ``max(0, 1 - x/tau)`` (:func:`hinge_surrogate`) can replace ``phi_tau`` in
both implementations (``surrogate``).

Two exact implementations are provided:

- :func:`dense_negatives_and_positives` builds the ``(n, n)`` matrices. It is the
  readable reference and the fastest choice for short lists.
- :func:`fast_negatives_and_positives` never materialises pairwise matrices. It
  sorts by target and splits the *target-rank values* recursively in halves (a
  CDQ divide and conquer): at each level the items of the lower half are sorted by
  score once, prefix sums of the polynomial moments ``1, s, s^2, t, ts, ts^2`` are
  taken, and every anchor of the upper half reads its sums over the score ranges
  where ``phi_tau`` is linear / quadratic with two binary searches. Because the
  split is on rank *values*, items with equal targets never meet across a split,
  which makes ties in ``t`` exact for free (they contribute 0 to NEG and are
  counted once in POS by a separate tie term). Time ``O(n log^2 n)``, memory
  ``O(n)`` per level. The gradient is computed analytically with one more sweep,
  so nothing of size ``n x n`` and no per-level autograd graph is stored.

``phi_tau`` is continuous with a continuous derivative (slope ``-2/tau`` at 0 from
both sides, 0 at ``tau``), so how the range boundaries treat ties in ``s`` changes
neither values nor gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable


def huber_surrogate(x: Tensor, tau: float) -> Tensor:
    """Huber-like smooth surrogate ``phi_tau`` of the step function ``1[x <= 0]``.

    Args:
        x: Score differences ``s_i - s_j`` of any shape.
        tau: Margin after which an anchor counts as ranked above the item.

    Returns:
        ``phi_tau(x)``, same shape as ``x``.
    """
    linear = 1.0 - 2.0 * x / tau
    quadratic = (1.0 - x / tau).square()
    zero = torch.zeros_like(x)
    return torch.where(x < 0, linear, torch.where(x < tau, quadratic, zero))


def hinge_surrogate(x: Tensor, tau: float) -> Tensor:
    """Hinge surrogate ``max(0, 1 - x/tau)`` of the step function ``1[x <= 0]``.

    With ``x = s_i - s_j`` this is ``max(0, tau + s_j - s_i) / tau``: 1 at ``x = 0``
    like the step, linear in between and 0 from the margin ``tau`` on. Its kink at
    ``x = tau`` has derivative 0 there (as ``relu``).

    Args:
        x: Score differences ``s_i - s_j`` of any shape.
        tau: Margin.

    Returns:
        ``max(0, 1 - x/tau)``, same shape as ``x``.
    """
    return torch.relu(1.0 - x / tau)


#: The surrogates of the step, by name (the fast path takes the name).
SURROGATES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "huber": huber_surrogate,
    "hinge": hinge_surrogate,
}


def dense_negatives_and_positives(
    scores: Tensor,
    targets: Tensor,
    valid: Tensor,
    tau: float,
    surrogate: Callable[[Tensor, float], Tensor] = huber_surrogate,
) -> tuple[Tensor, Tensor]:
    """Reference computation of NEG and POS with ``(B, n, n)`` pairwise matrices.

    Args:
        scores: Student scores. Shape: (B, n).
        targets: Teacher targets (no gradient). Shape: (B, n).
        valid: Boolean validity mask; invalid items take part in no pair.
            Shape: (B, n).
        tau: Margin of the surrogate.
        surrogate: Smoothing of the step ``1[s_j >= s_i]`` as a function of
            ``(s_i - s_j, tau)``; the Huber-like ``phi_tau`` by default.

    Returns:
        ``(neg, pos)``, both of shape (B, n). ``neg`` is differentiable with respect
        to ``scores``; ``pos`` is a float count without gradient (0 for invalid
        anchors).
    """
    pair_valid = (valid[:, :, None] & valid[:, None, :]).to(scores.dtype)
    score_diff = scores[:, :, None] - scores[:, None, :]  # s_i - s_j
    target_gap = (targets[:, :, None] - targets[:, None, :]).clamp_min(0.0)
    neg = (target_gap * surrogate(score_diff, tau) * pair_valid).sum(dim=2)
    with torch.no_grad():
        higher_target = targets[:, None, :] >= targets[:, :, None]  # t_j >= t_i
        higher_score = scores[:, None, :] >= scores[:, :, None]  # s_j >= s_i
        pos = (higher_target & higher_score).to(scores.dtype)
        pos = (pos * pair_valid).sum(dim=2)
    return neg, pos


def _sort_rows_then_values(row: Tensor, values: Tensor) -> Tensor:
    """Permutation that sorts by ``row`` first and by ``values`` within a row."""
    by_value = torch.argsort(values, stable=True)
    by_row = torch.argsort(row[by_value], stable=True)
    return by_value[by_row]


def _target_ranks(row: Tensor, targets: Tensor) -> tuple[Tensor, int]:
    """Dense ranks of the targets within each row, offset so rows never share a block.

    Returns:
        ``(rank, num_levels)``: ``rank = row * 2**num_levels + dense_rank_in_row``
        where ``2**num_levels`` is at least the largest number of distinct targets
        in a row.
    """
    order = _sort_rows_then_values(row, targets)
    sorted_targets = targets[order]
    sorted_rows = row[order]
    new_value = torch.ones_like(sorted_rows, dtype=torch.bool)
    new_value[1:] = (sorted_targets[1:] != sorted_targets[:-1]) | (
        sorted_rows[1:] != sorted_rows[:-1]
    )
    distinct_id = torch.cumsum(new_value.long(), dim=0) - 1
    new_row = torch.ones_like(new_value)
    new_row[1:] = sorted_rows[1:] != sorted_rows[:-1]
    row_start_id = torch.cummax(torch.where(new_row, distinct_id, 0), dim=0).values
    rank_in_row = distinct_id - row_start_id
    max_distinct = int(rank_in_row.max().item()) + 1
    num_levels = max(max_distinct - 1, 0).bit_length()
    rank = torch.empty_like(rank_in_row)
    rank[order] = sorted_rows * (1 << num_levels) + rank_in_row
    return rank, num_levels


def _range_sums(
    sorted_keys: Tensor, prefix: Tensor, lower_keys: Tensor, upper_keys: Tensor
) -> Tensor:
    """Sums of the rows of ``prefix``'s increments whose keys lie in ``[lower, upper)``.

    Args:
        sorted_keys: Ascending int64 keys. Shape: (m,).
        prefix: Prefix sums with a leading zero row. Shape: (m + 1, c).
        lower_keys: Inclusive lower key per query. Shape: (q,).
        upper_keys: Exclusive upper key per query. Shape: (q,).

    Returns:
        Per-query sums. Shape: (q, c).
    """
    lower = torch.searchsorted(sorted_keys, lower_keys)
    upper = torch.searchsorted(sorted_keys, upper_keys)
    return prefix[upper] - prefix[lower]


def _prefix(values: Tensor) -> Tensor:
    """Prefix sums over dim 0 with a leading zero row."""
    zero = values.new_zeros((1,) + values.shape[1:])
    return torch.cat([zero, torch.cumsum(values, dim=0)], dim=0)


class _Plan:
    """Sort orders shared by the forward and backward sweeps of one list."""

    def __init__(self, scores: Tensor, targets: Tensor, row: Tensor, tau: float):
        m = scores.shape[0]
        self.size = m
        self.target_rank, self.num_levels = _target_ranks(row, targets)
        score_order = torch.argsort(scores, stable=True)
        self.score_rank = torch.empty_like(score_order)
        self.score_rank[score_order] = torch.arange(m, device=scores.device)
        sorted_scores = scores[score_order]
        # Items with rank < bound: s <= s_i, s <= s_i - tau, s < s_i, s < s_i + tau.
        self.rank_le = torch.searchsorted(sorted_scores, scores, right=True)
        self.rank_le_minus_tau = torch.searchsorted(
            sorted_scores, scores - tau, right=True
        )
        self.rank_lt = torch.searchsorted(sorted_scores, scores, right=False)
        self.rank_lt_plus_tau = torch.searchsorted(
            sorted_scores, scores + tau, right=False
        )
        self._levels: dict[int, tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = {}

    def level(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Half-block keys of level ``k`` (computed once, reused by the backward).

        Returns:
            ``(segment, order, sorted_keys, upper_idx, lower_idx)``: the half-block
            id of every item, the permutation sorting items by (half-block, score
            rank), the sorted keys, and the indices of items in upper / lower halves.
        """
        if k not in self._levels:
            segment = self.target_rank >> k
            keys = segment * self.size + self.score_rank
            sorted_keys, order = torch.sort(keys)
            is_upper = (segment & 1).bool()
            upper_idx = torch.nonzero(is_upper).squeeze(1)
            lower_idx = torch.nonzero(~is_upper).squeeze(1)
            self._levels[k] = (segment, order, sorted_keys, upper_idx, lower_idx)
        return self._levels[k]


def _forward_sweep(
    scores: Tensor, targets: Tensor, plan: _Plan, tau: float, surrogate: str
) -> tuple[Tensor, Tensor, Tensor]:
    """NEG, POS and dNEG_i/ds_i for all items (no autograd)."""
    m = plan.size
    s, t = scores, targets
    neg = torch.zeros_like(s)
    dneg_anchor = torch.zeros_like(s)
    pos = torch.zeros_like(s)
    a = 1.0 - s / tau
    c = 1.0 - 2.0 * s / tau
    moments = torch.stack([torch.ones_like(s), s, s * s, t, t * s, t * s * s], dim=1)

    # Ties in t (same row): POS counts j with equal target and s_j >= s_i.
    tie_keys = plan.target_rank * m + plan.score_rank
    tie_sorted = torch.sort(tie_keys).values
    base = plan.target_rank * m
    pos += (
        torch.searchsorted(tie_sorted, base + m)
        - torch.searchsorted(tie_sorted, base + plan.rank_lt)
    ).to(s.dtype)

    for k in range(plan.num_levels):
        segment, order, sorted_keys, upper, lower = plan.level(k)
        prefix = _prefix(moments[order])
        count_prefix = prefix[:, :1]

        # Upper-half anchors i against lower-half items j (t_j < t_i).
        if upper.numel() > 0 and surrogate == "hinge":
            ti, ai = t[upper], a[upper]
            base = (segment[upper] - 1) * m
            # (t_i - t_j)(a_i + s_j / tau) over s_j > s_i - tau.
            lin = _range_sums(
                sorted_keys, prefix, base + plan.rank_le_minus_tau[upper], base + m
            )
            n_l, s_l, _, t_l, ts_l, _ = lin.unbind(1)
            neg[upper] += ti * ai * n_l + ti / tau * s_l - ai * t_l - ts_l / tau
            dneg_anchor[upper] += -1.0 / tau * (ti * n_l - t_l)
        elif upper.numel() > 0:
            ti, ai, ci = t[upper], a[upper], c[upper]
            base = (segment[upper] - 1) * m
            quad = _range_sums(
                sorted_keys,
                prefix,
                base + plan.rank_le_minus_tau[upper],
                base + plan.rank_le[upper],
            )
            lin = _range_sums(sorted_keys, prefix, base + plan.rank_le[upper], base + m)
            n_q, s_q, ss_q, t_q, ts_q, tss_q = quad.unbind(1)
            n_l, s_l, _, t_l, ts_l, _ = lin.unbind(1)
            # (t_i - t_j)(c_i + 2 s_j / tau) over s_j > s_i.
            neg_lin = ti * ci * n_l + 2.0 * ti / tau * s_l - ci * t_l - 2.0 / tau * ts_l
            # (t_i - t_j)(a_i + s_j / tau)^2 over s_i - tau < s_j <= s_i.
            neg_quad = (
                ti * ai * ai * n_q
                + 2.0 * ti * ai / tau * s_q
                + ti / tau**2 * ss_q
                - ai * ai * t_q
                - 2.0 * ai / tau * ts_q
                - tss_q / tau**2
            )
            neg[upper] += neg_lin + neg_quad
            # d/ds_i of the same sums: phi'(x) = -2/tau and -2/tau (a_i + s_j/tau).
            dlin = -2.0 / tau * (ti * n_l - t_l)
            dquad = (
                -2.0 / tau * (ti * ai * n_q + ti / tau * s_q - ai * t_q - ts_q / tau)
            )
            dneg_anchor[upper] += dlin + dquad

        # Lower-half anchors i against upper-half items j (t_j > t_i) for POS.
        if lower.numel() > 0:
            base = (segment[lower] + 1) * m
            pos[lower] += _range_sums(
                sorted_keys, count_prefix, base + plan.rank_lt[lower], base + m
            ).squeeze(1)
    return neg, pos, dneg_anchor


def _backward_item_sweep(
    scores: Tensor,
    targets: Tensor,
    grad_neg: Tensor,
    plan: _Plan,
    tau: float,
    surrogate: str,
) -> Tensor:
    """``C_k = sum_i g_i (t_i - t_k)_+ phi'(s_i - s_k)`` for every item ``k``."""
    m = plan.size
    s, t, g = scores, targets, grad_neg
    out = torch.zeros_like(s)
    b = 1.0 + s / tau
    moments = torch.stack([g, g * t, g * s, g * t * s], dim=1)
    for k in range(plan.num_levels):
        segment, order, sorted_keys, _, lower = plan.level(k)
        if lower.numel() == 0:
            continue
        prefix = _prefix(moments[order])
        tk, bk = t[lower], b[lower]
        base = (segment[lower] + 1) * m
        if surrogate == "hinge":
            # Anchors with s_i < s_k + tau (phi' = -1/tau).
            hinge = _range_sums(
                sorted_keys, prefix, base, base + plan.rank_lt_plus_tau[lower]
            )
            g_h, gt_h, _, _ = hinge.unbind(1)
            out[lower] += -1.0 / tau * (gt_h - tk * g_h)
            continue
        # Anchors with s_i < s_k (phi' = -2/tau).
        lin = _range_sums(sorted_keys, prefix, base, base + plan.rank_lt[lower])
        # Anchors with s_k <= s_i < s_k + tau (phi' = -2/tau (b_k - s_i/tau)).
        quad = _range_sums(
            sorted_keys,
            prefix,
            base + plan.rank_lt[lower],
            base + plan.rank_lt_plus_tau[lower],
        )
        g_l, gt_l, _, _ = lin.unbind(1)
        g_q, gt_q, gs_q, gts_q = quad.unbind(1)
        c_lin = -2.0 / tau * (gt_l - tk * g_l)
        c_quad = (
            -2.0 / tau * (bk * gt_q - gts_q / tau - tk * bk * g_q + tk / tau * gs_q)
        )
        out[lower] += c_lin + c_quad
    return out


class _FastNegatives(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        scores: Tensor,
        targets: Tensor,
        row: Tensor,
        tau: float,
        surrogate: str,
    ) -> tuple[Tensor, Tensor]:
        plan = _Plan(scores, targets, row, tau)
        neg, pos, dneg_anchor = _forward_sweep(scores, targets, plan, tau, surrogate)
        ctx.save_for_backward(scores, targets, dneg_anchor)
        ctx.plan = plan  # type: ignore[attr-defined]
        ctx.tau = tau  # type: ignore[attr-defined]
        ctx.surrogate = surrogate  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(pos)
        return neg, pos

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_neg: Tensor, grad_pos: Tensor
    ) -> tuple[Tensor | None, None, None, None, None]:
        scores, targets, dneg_anchor = ctx.saved_tensors  # type: ignore[attr-defined]
        plan: _Plan = ctx.plan  # type: ignore[attr-defined]
        tau: float = ctx.tau  # type: ignore[attr-defined]
        surrogate: str = ctx.surrogate  # type: ignore[attr-defined]
        item_terms = _backward_item_sweep(
            scores, targets, grad_neg, plan, tau, surrogate
        )
        grad_scores = grad_neg * dneg_anchor - item_terms
        return grad_scores, None, None, None, None


def fast_negatives_and_positives(
    scores: Tensor,
    targets: Tensor,
    row: Tensor,
    tau: float,
    surrogate: str = "huber",
) -> tuple[Tensor, Tensor]:
    """Exact NEG and POS without pairwise matrices, in ``O(n log^2 n)``.

    Args:
        scores: Student scores of all valid items of all lists. Shape: (m,).
        targets: Teacher targets (no gradient). Shape: (m,).
        row: Index of the list each item belongs to (items of different lists never
            interact). Shape: (m,), int64.
        tau: Margin of the surrogate.
        surrogate: ``"huber"`` (:func:`huber_surrogate`, default) or ``"hinge"``
            (:func:`hinge_surrogate`; one linear piece for ``s_j > s_i - tau``).

    Returns:
        ``(neg, pos)``, both of shape (m,). ``neg`` is differentiable with respect to
        ``scores`` (analytic backward); ``pos`` carries no gradient.
    """
    if scores.numel() == 0:
        return scores * 0.0, scores.detach() * 0.0
    if surrogate not in SURROGATES:
        raise ValueError(
            f"surrogate must be one of {tuple(SURROGATES)}, got {surrogate!r}."
        )
    neg, pos = _FastNegatives.apply(scores, targets.detach(), row, tau, surrogate)
    return neg, pos
