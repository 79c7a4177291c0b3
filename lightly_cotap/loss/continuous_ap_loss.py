"""Noise-tolerant ranking loss: average precision extended to continuous targets."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightly_cotap.loss._ranking_ops import (
    SURROGATES,
    dense_negatives_and_positives,
    fast_negatives_and_positives,
)

_METHODS = ("auto", "dense", "fast")


class ContinuousAPLoss(nn.Module):
    """Implementation of the continuous-target AP ranking loss of CoTAP [0].

    The loss ranks a list of student scores ``s`` (e.g. student cosine similarities
    of patch pairs) against continuous teacher targets ``t`` (e.g. the teacher's
    cosine similarities of the same pairs). For every anchor ``i``:

    - ``NEG_i = sum_j (t_i - t_j)_+ * phi_tau(s_i - s_j)``: items with a lower target
      that the student ranks above (or within ``tau`` below) the anchor, weighted by
      the target gap. ``phi_tau`` is a Huber-like surrogate of the step
      ``1[s_j >= s_i]``: ``1 - 2x/tau`` for ``x < 0``, ``(1 - x/tau)^2`` for
      ``0 <= x < tau`` and ``0`` for ``x >= tau``.
    - ``POS_i = #{j : t_j >= t_i and s_j >= s_i}``: items with a target at least as
      high that are ranked at least as high (hard count, no gradient, ``j = i``
      included so ``POS_i >= 1``).
    - ``u_i = kappa * NEG_i / POS_i`` and ``l_i = u_i / (1 + u_i)``.

    The loss is ``sum_i w_i l_i / sum_i w_i`` with anchor weights ``w`` that default
    to ``(t_i - weight_offset)_+``. With binary targets and the exact step instead of
    ``phi_tau``, the mean of ``l_i`` over positive anchors is ``1 - AP``; the Huber
    surrogate is an upper bound of it. The gradient ``kappa / (POS_i (1 + u_i)^2)``
    of ``l_i`` with respect to ``NEG_i`` down-weights badly mis-ranked anchors, which
    makes the loss tolerant to noisy pseudo targets.

    Two exact implementations are chosen automatically: a dense one that builds the
    ``(n, n)`` pair matrices (fastest for short lists) and a sort-based one that never
    materialises them (``O(n log^2 n)`` time, ``O(n)`` memory), used when the lists
    are long. Both agree to floating-point precision for values and gradients,
    including ties in ``s`` and in ``t``.

    This implementation follows the loss of the code published by the authors [1],
    with two documented differences: the ``1e-5`` added to ``POS`` and to
    ``sum_i w_i`` there is dropped (``POS_i >= 1`` always), and an empty list or
    all-zero weights give a zero loss that keeps the graph instead of ``0 / 1e-5``.

    - [0]: Wen et al., Semantic Concentration for Self-Supervised Dense
      Representations Learning, 2025, https://arxiv.org/abs/2509.09429
    - [1]: https://github.com/KID-7391/CoTAP (``losses/intra_sample.py``)

    Attributes:
        tau: Margin of the surrogate: an anchor scored ``tau`` above an item no
            longer counts that item as ranked above it. Paper default 0.5.
        kappa: Multiplier of ``NEG / POS`` (``ap_mul`` in the official code).
            Paper default 1.
        weight_offset: ``delta`` of the default anchor weights ``(t - delta)_+``;
            anchors with a target below ``delta`` get weight 0. Paper default -0.2.
        method: ``"auto"`` (default), ``"dense"`` or ``"fast"``.
        dense_max_pairs: With ``method="auto"`` the dense path is used while the
            number of pair entries ``B * n * n`` is at most this value.

    Examples:
        >>> loss_fn = ContinuousAPLoss()
        >>> student = torch.randn(4200, requires_grad=True).tanh()
        >>> teacher = torch.randn(4200).tanh()
        >>> loss = loss_fn(scores=student, targets=teacher)
        >>> loss.backward()
    """

    #: Name of the step surrogate in :data:`~lightly_cotap.loss._ranking_ops.SURROGATES`.
    _surrogate = "huber"

    def __init__(
        self,
        tau: float = 0.5,
        kappa: float = 1.0,
        weight_offset: float = -0.2,
        method: str = "auto",
        dense_max_pairs: int = 2**18,
    ) -> None:
        """Initializes the ContinuousAPLoss with the specified parameters.

        Args:
            tau: Margin of the Huber surrogate, > 0.
            kappa: Multiplier of ``NEG / POS``, > 0.
            weight_offset: Offset ``delta`` of the default weights ``(t - delta)_+``.
            method: ``"auto"``, ``"dense"`` or ``"fast"``.
            dense_max_pairs: Largest ``B * n * n`` for which ``"auto"`` uses the dense
                path, >= 0.

        Raises:
            ValueError: If an argument is out of its range.
        """
        super().__init__()
        if not (isinstance(tau, (int, float)) and tau > 0 and tau != float("inf")):
            raise ValueError(f"tau must be a finite number > 0, got tau={tau!r}.")
        if not (
            isinstance(kappa, (int, float)) and kappa > 0 and kappa != float("inf")
        ):
            raise ValueError(f"kappa must be a finite number > 0, got kappa={kappa!r}.")
        if not (
            isinstance(weight_offset, (int, float))
            and torch.isfinite(torch.tensor(float(weight_offset)))
        ):
            raise ValueError(
                f"weight_offset must be a finite number, got weight_offset={weight_offset!r}."
            )
        if method not in _METHODS:
            raise ValueError(
                f"method must be one of {_METHODS}, got method={method!r}."
            )
        if dense_max_pairs < 0:
            raise ValueError(
                f"dense_max_pairs must be >= 0, got dense_max_pairs={dense_max_pairs}."
            )
        self.tau = float(tau)
        self.kappa = float(kappa)
        self.weight_offset = float(weight_offset)
        self.method = method
        self.dense_max_pairs = dense_max_pairs

    def forward(
        self,
        *,
        scores: Tensor,
        targets: Tensor,
        weights: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Computes the loss over one list or a batch of independent lists.

        Args:
            scores: Student scores, differentiable. Shape: (n,) for one list or
                (B, n) for B independent lists (one ranking per row).
            targets: Teacher targets; must not require grad (detach them).
                Same shape as ``scores``.
            weights: Optional non-negative anchor weights. Defaults to
                ``(targets - weight_offset)_+``. Same shape as ``scores``.
            mask: Optional boolean validity mask, True = keep. Masked items are
                neither anchors nor compared against. Same shape as ``scores``.

        Returns:
            Scalar loss (float32, or float64 for float64 inputs): the weighted mean of
            ``l_i`` over all valid anchors of all rows. If no anchor has positive
            weight (empty list, everything masked, or all weights zero) the loss is a
            zero that stays connected to ``scores``' graph.

        Raises:
            ValueError: On shape mismatches, non-finite values among the valid items,
                negative weights, a non-boolean mask, or targets that require grad.
        """
        validate_list_inputs(scores=scores, targets=targets, weights=weights, mask=mask)
        squeeze = scores.dim() == 1
        compute_dtype = (
            torch.float64 if scores.dtype == torch.float64 else torch.float32
        )
        with torch.autocast(device_type=scores.device.type, enabled=False):
            s = scores.to(compute_dtype)
            t = targets.detach().to(compute_dtype)
            if squeeze:
                s, t = s[None], t[None]
            valid = (
                torch.ones_like(s, dtype=torch.bool)
                if mask is None
                else (mask[None] if squeeze else mask)
            )
            # Masked entries may hold anything (padding, NaN): neutralise them.
            s = torch.where(valid, s, torch.zeros_like(s))
            t = torch.where(valid, t, torch.zeros_like(t))
            if weights is None:
                w = (t - self.weight_offset).clamp_min(0.0)
            else:
                w = weights.detach().to(compute_dtype)
                w = w[None] if squeeze else w
            w = torch.where(valid, w.nan_to_num(0.0), torch.zeros_like(w))
            if not bool((w > 0).any()):
                return (s * 0.0).sum()
            neg, pos, w = self._negatives_and_positives(s, t, valid, w)
            u = self.kappa * neg / pos
            per_anchor = u / (1.0 + u)
            return (w * per_anchor).sum() / w.sum()

    def _use_dense(self, num_rows: int, num_items: int) -> bool:
        if self.method == "auto":
            return num_rows * num_items * num_items <= self.dense_max_pairs
        return self.method == "dense"

    def _negatives_and_positives(
        self, s: Tensor, t: Tensor, valid: Tensor, w: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """NEG, POS and weights of the valid anchors (flattened or (B, n))."""
        if self._use_dense(s.shape[0], s.shape[1]):
            neg, pos = dense_negatives_and_positives(
                s, t, valid, self.tau, surrogate=SURROGATES[self._surrogate]
            )
            # Invalid anchors have w = 0 and POS = 0; avoid 0/0 in their l_i.
            pos = torch.where(valid, pos, torch.ones_like(pos))
            return neg, pos, w
        rows = torch.arange(s.shape[0], device=s.device)[:, None].expand_as(s)
        fast_dtype = torch.float32 if s.device.type == "mps" else torch.float64
        neg, pos = fast_negatives_and_positives(
            s[valid].to(fast_dtype),
            t[valid].to(fast_dtype),
            rows[valid],
            self.tau,
            surrogate=self._surrogate,
        )
        return neg.to(s.dtype), pos.to(s.dtype), w[valid]


def validate_list_inputs(
    *, scores: Tensor, targets: Tensor, weights: Tensor | None, mask: Tensor | None
) -> None:
    """Raises ValueError for lists a list criterion cannot score.

    Shared by :class:`ContinuousAPLoss` and the criteria of
    :mod:`lightly_cotap.loss.correspondence_criteria`: ``scores`` floating point of
    shape (n,) or (B, n); ``targets``, ``weights`` and ``mask`` of the same shape;
    targets without grad; a bool mask; finite values and non-negative weights among
    the valid items.
    """
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        raise ValueError(
            f"scores must be a floating point tensor, got {type(scores).__name__}"
            + (f" of dtype {scores.dtype}" if isinstance(scores, Tensor) else "")
            + "."
        )
    if scores.dim() not in (1, 2):
        raise ValueError(
            f"scores must have shape (n,) or (B, n), got shape {tuple(scores.shape)}."
        )
    if not isinstance(targets, Tensor) or targets.shape != scores.shape:
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets)
        raise ValueError(
            f"targets must have the same shape as scores {tuple(scores.shape)}, "
            f"got {shape}."
        )
    if targets.requires_grad:
        raise ValueError(
            "targets must not require grad (they are teacher pseudo-labels); call "
            f"targets.detach(). Got targets of shape {tuple(targets.shape)} with "
            "requires_grad=True."
        )
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.shape != scores.shape:
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask)
            raise ValueError(
                f"mask must have the same shape as scores {tuple(scores.shape)}, "
                f"got {shape}."
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}.")
    if weights is not None:
        if not isinstance(weights, Tensor) or weights.shape != scores.shape:
            shape = (
                tuple(weights.shape) if isinstance(weights, Tensor) else type(weights)
            )
            raise ValueError(
                f"weights must have the same shape as scores {tuple(scores.shape)}, "
                f"got {shape}."
            )
    valid = mask if mask is not None else torch.ones_like(scores, dtype=torch.bool)
    named = [("scores", scores), ("targets", targets)]
    if weights is not None:
        named.append(("weights", weights))
    for name, value in named:
        finite = torch.isfinite(value.detach()) | ~valid
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(
                f"{name} of shape {tuple(value.shape)} contains {bad} non-finite "
                "value(s) among the valid (unmasked) items."
            )
    if weights is not None and bool(((weights.detach() < 0) & valid).any()):
        raise ValueError(
            f"weights of shape {tuple(weights.shape)} must be non-negative."
        )
