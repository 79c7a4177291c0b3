"""Pairwise ranking terms of the continuous-target AP loss.

Over 400 lines: the dense reference path and the sort-based path with its analytic
backward compute the same terms and are tested against each other.

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
  so nothing of size ``n x n`` and no per-level autograd graph is stored. The
  halves are told apart by masks over all items rather than by index lists, and
  the number of levels can be bounded by the list length, so that nothing needs
  a value from the device (no host synchronisation).

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


def _target_ranks(
    row: Tensor, targets: Tensor, row_length: int | None
) -> tuple[Tensor, int]:
    """Dense ranks of the targets within each row, offset so rows never share a block.

    Args:
        row: List index of every item. Shape: (m,).
        targets: Targets. Shape: (m,).
        row_length: Upper bound of the number of items (hence of distinct targets)
            in a row, or None to count the distinct targets.

    Returns:
        ``(rank, num_levels)``: ``rank = row * 2**num_levels + dense_rank_in_row``
        where ``2**num_levels`` is at least the largest number of distinct targets
        in a row. With ``row_length`` the number of levels is known without reading
        a value from the device (no host synchronisation); with many tied targets
        the extra levels find no pairs and add only their time.
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
    if row_length is None:
        row_length = int(rank_in_row.max().item()) + 1
    num_levels = max(row_length - 1, 0).bit_length()
    rank = torch.empty_like(rank_in_row)
    rank[order] = sorted_rows * (1 << num_levels) + rank_in_row
    return rank, num_levels


def _prefix_at(sorted_keys: Tensor, prefix: Tensor, bounds: Tensor) -> Tensor:
    """Prefix sums up to (excluding) the first key ``>= bound``, for every bound.

    The sum of the rows whose keys lie in ``[lower, upper)`` is
    ``_prefix_at(.., upper) - _prefix_at(.., lower)``.

    Args:
        sorted_keys: Ascending int64 keys. Shape: (m,).
        prefix: Prefix sums with a leading zero row. Shape: (m + 1, c).
        bounds: Int64 key bounds of any shape ``S``.

    Returns:
        Shape: (*S, c).
    """
    return prefix[torch.searchsorted(sorted_keys, bounds)]


def _prefix(values: Tensor) -> Tensor:
    """Prefix sums over dim 0 with a leading zero row."""
    zero = values.new_zeros((1,) + values.shape[1:])
    return torch.cat([zero, torch.cumsum(values, dim=0)], dim=0)


class _Plan:
    """Sort orders shared by the forward and backward sweeps of one list."""

    def __init__(
        self,
        scores: Tensor,
        targets: Tensor,
        row: Tensor,
        tau: float,
        row_length: int | None,
    ):
        m = scores.shape[0]
        self.size = m
        self.target_rank, self.num_levels = _target_ranks(row, targets, row_length)
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
        self._levels: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def level(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Half-block keys of level ``k`` (computed once, reused by the backward).

        Returns:
            ``(segment, order, sorted_keys, is_upper)``: the half-block id of every
            item, the permutation sorting items by (half-block, score rank), the
            sorted keys, and whether each item lies in an upper half. Both halves
            are processed for all items and told apart by ``is_upper`` (instead of
            index lists, whose length would have to be read from the device).
        """
        if k not in self._levels:
            segment = self.target_rank >> k
            keys = segment * self.size + self.score_rank
            sorted_keys, order = torch.sort(keys)
            is_upper = (segment & 1).bool()
            self._levels[k] = (segment, order, sorted_keys, is_upper)
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
        segment, order, sorted_keys, is_upper = plan.level(k)
        prefix = _prefix(moments[order])
        below = (segment - 1) * m
        above = (segment + 1) * m
        # Upper-half anchors i against the lower half (t_j < t_i): the quadratic
        # range s_i - tau < s_j <= s_i of phi, then the linear one s_j > s_i.
        # Lower-half anchors i against the upper half (t_j > t_i), for POS: the
        # items with s_j >= s_i, in the first range (the second one is empty).
        at = _prefix_at(
            sorted_keys,
            prefix,
            torch.stack(
                [
                    torch.where(
                        is_upper, below + plan.rank_le_minus_tau, above + plan.rank_lt
                    ),
                    torch.where(is_upper, below + plan.rank_le, above + m),
                    torch.where(is_upper, below + m, above + m),
                ]
            ),
        )
        quad, lin = at[1] - at[0], at[2] - at[1]
        if surrogate == "hinge":
            # (t_i - t_j)(a_i + s_j / tau) over s_j > s_i - tau (both ranges).
            n_h, s_h, _, t_h, ts_h, _ = (at[2] - at[0]).unbind(1)
            neg_upper = t * a * n_h + t / tau * s_h - a * t_h - ts_h / tau
            dneg_upper = -1.0 / tau * (t * n_h - t_h)
        else:
            n_q, s_q, ss_q, t_q, ts_q, tss_q = quad.unbind(1)
            n_l, s_l, _, t_l, ts_l, _ = lin.unbind(1)
            # (t_i - t_j)(c_i + 2 s_j / tau) over s_j > s_i.
            neg_lin = t * c * n_l + 2.0 * t / tau * s_l - c * t_l - 2.0 / tau * ts_l
            # (t_i - t_j)(a_i + s_j / tau)^2 over s_i - tau < s_j <= s_i.
            neg_quad = (
                t * a * a * n_q
                + 2.0 * t * a / tau * s_q
                + t / tau**2 * ss_q
                - a * a * t_q
                - 2.0 * a / tau * ts_q
                - tss_q / tau**2
            )
            neg_upper = neg_lin + neg_quad
            # d/ds_i of the same sums: phi'(x) = -2/tau and -2/tau (a_i + s_j/tau).
            dlin = -2.0 / tau * (t * n_l - t_l)
            dquad = -2.0 / tau * (t * a * n_q + t / tau * s_q - a * t_q - ts_q / tau)
            dneg_upper = dlin + dquad
        neg += torch.where(is_upper, neg_upper, 0.0)
        dneg_anchor += torch.where(is_upper, dneg_upper, 0.0)
        pos += torch.where(is_upper, 0.0, quad[:, 0])
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
        segment, order, sorted_keys, is_upper = plan.level(k)
        prefix = _prefix(moments[order])
        # Lower-half items k against the anchors i of the upper half (t_i > t_k):
        # anchors with s_i < s_k (phi' = -2/tau), then s_k <= s_i < s_k + tau
        # (phi' = -2/tau (b_k - s_i/tau)).
        above = (segment + 1) * m
        at = _prefix_at(
            sorted_keys,
            prefix,
            torch.stack([above, above + plan.rank_lt, above + plan.rank_lt_plus_tau]),
        )
        if surrogate == "hinge":
            # Anchors with s_i < s_k + tau (phi' = -1/tau).
            g_h, gt_h, _, _ = (at[2] - at[0]).unbind(1)
            terms = -1.0 / tau * (gt_h - t * g_h)
        else:
            lin, quad = at[1] - at[0], at[2] - at[1]
            g_l, gt_l, _, _ = lin.unbind(1)
            g_q, gt_q, gs_q, gts_q = quad.unbind(1)
            c_lin = -2.0 / tau * (gt_l - t * g_l)
            c_quad = (
                -2.0 / tau * (b * gt_q - gts_q / tau - t * b * g_q + t / tau * gs_q)
            )
            terms = c_lin + c_quad
        out += torch.where(is_upper, 0.0, terms)
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
        row_length: int | None,
    ) -> tuple[Tensor, Tensor]:
        plan = _Plan(scores, targets, row, tau, row_length)
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
    ) -> tuple[Tensor | None, None, None, None, None, None]:
        scores, targets, dneg_anchor = ctx.saved_tensors  # type: ignore[attr-defined]
        plan: _Plan = ctx.plan  # type: ignore[attr-defined]
        tau: float = ctx.tau  # type: ignore[attr-defined]
        surrogate: str = ctx.surrogate  # type: ignore[attr-defined]
        item_terms = _backward_item_sweep(
            scores, targets, grad_neg, plan, tau, surrogate
        )
        grad_scores = grad_neg * dneg_anchor - item_terms
        return grad_scores, None, None, None, None, None


def fast_negatives_and_positives(
    scores: Tensor,
    targets: Tensor,
    row: Tensor,
    tau: float,
    surrogate: str = "huber",
    row_length: int | None = None,
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
        row_length: Upper bound of the number of items in one list: the divide
            and conquer takes ``ceil(log2(row_length))`` levels, known without
            reading the device. None (default) counts the distinct targets of
            each list, which takes fewer levels for tied targets but reads one
            value from the device (a host synchronisation on accelerators).

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
    neg, pos = _FastNegatives.apply(
        scores, targets.detach(), row, tau, surrogate, row_length
    )
    return neg, pos
