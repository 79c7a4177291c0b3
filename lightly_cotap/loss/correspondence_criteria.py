"""Criteria that score a list of patch-pair similarities against teacher targets.

Over 400 lines: six small exchangeable criteria of one interface, kept side by side
so that their conventions (shapes, weights, masks) stay the same.

:class:`~lightly_cotap.loss.CoTAPLoss` builds a list of student similarities
(``scores``) and teacher similarities (``targets``) of patch pairs, with anchor
weights, and hands it to a criterion. Its default criterion is the continuous-target
AP loss :class:`~lightly_cotap.loss.ContinuousAPLoss` of CoTAP [0]; this module
holds the usual alternatives for correspondence distillation with the same keyword
signature (:class:`CorrespondenceCriterion`), so they plug into the same pipeline:

- :class:`SimilarityMSELoss`: squared error between student and teacher similarity;
- :class:`SimilarityKLLoss`: KL divergence between the softmaxed teacher and student
  lists (rows);
- :class:`STEGOCorrelationLoss`: STEGO's correlation loss [1],
  ``-(t - shift) * max(s, 0)``;
- :class:`TopKInfoNCELoss`: InfoNCE with the teacher's top-k items of a list as
  positives and the rest as negatives;
- :class:`BinaryAPLoss`: the decision-dependent AP loss: targets thresholded to
  {0, 1}, then the same smoothed AP as ``ContinuousAPLoss``;
- :class:`HingeContinuousAPLoss`: ``ContinuousAPLoss`` with the hinge surrogate of
  the rank indicator instead of its Huber-like one.

They live in one module because they are one set (the alternatives a user compares
against CoTAP's criterion), each is a few lines on top of the shared input
validation and weighted reduction, and none is used without the others' context.

All criteria follow the conventions of ``ContinuousAPLoss``: ``scores`` of shape
``(n,)`` are one list, ``(B, n)`` are ``B`` independent lists (rows); ``targets``,
``weights`` and ``mask`` have the shape of ``scores``; masked items (``mask`` False)
take part in nothing and may hold NaN; the computation runs in float32 (float64 for
float64 scores) outside autocast; if nothing has positive weight the loss is a zero
that stays connected to ``scores``' graph; bad inputs raise ``ValueError``.

- [0]: Wen et al., Semantic Concentration for Self-Supervised Dense
  Representations Learning, 2025, https://arxiv.org/abs/2509.09429
- [1]: Hamilton et al., Unsupervised Semantic Segmentation by Distilling Feature
  Correspondences (STEGO), ICLR 2022, https://arxiv.org/abs/2203.08414
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor, nn

from lightly_cotap.loss.continuous_ap_loss import (
    ContinuousAPLoss,
    validate_list_inputs,
)


class CorrespondenceCriterion(Protocol):
    """Keyword signature of a criterion that :class:`CoTAPLoss` can use.

    ``CoTAPLoss`` calls ``criterion(scores=s, targets=t, weights=w)`` once per
    pooling size with one flattened list: ``s`` the student cosines (shape (n,),
    differentiable), ``t`` the detached teacher cosines (shape (n,)), ``w`` the
    non-negative anchor weights (shape (n,)), and no ``mask``. The result must be a
    scalar tensor. ``scores`` of shape (B, n) (independent lists) and ``mask`` are
    part of the signature for direct use.
    """

    def __call__(
        self,
        *,
        scores: Tensor,
        targets: Tensor,
        weights: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor: ...


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {name}={value!r}.")


def _check_finite(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {name}={value!r}.")


def _as_rows(
    scores: Tensor, targets: Tensor, weights: Tensor | None, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validated ``(s, t, w, valid)`` of shape (B, n) in the compute dtype.

    Masked entries of ``s``, ``t`` and ``w`` are set to 0; ``w`` defaults to 1.
    """
    validate_list_inputs(scores=scores, targets=targets, weights=weights, mask=mask)
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    s = scores.to(dtype)
    t = targets.detach().to(dtype)
    w = torch.ones_like(t) if weights is None else weights.detach().to(dtype)
    valid = torch.ones_like(s, dtype=torch.bool) if mask is None else mask
    if s.dim() == 1:
        s, t, w, valid = s[None], t[None], w[None], valid[None]
    zero = torch.zeros_like(s)
    return (
        torch.where(valid, s, zero),
        torch.where(valid, t, zero),
        torch.where(valid, w, zero),
        valid,
    )


def _weighted_mean(values: Tensor, weights: Tensor, s: Tensor) -> Tensor:
    """``sum(weights * values) / sum(weights)``, or a zero on ``s``' graph.

    The zero is returned when the weights sum to 0 (nothing to score).
    """
    total = weights.sum()
    if not bool(total > 0):
        return (s * 0.0).sum()
    return (weights * values).sum() / total


class SimilarityMSELoss(nn.Module):
    """Mean squared error between student and teacher similarities.

    The loss is ``sum_i w_i (s_i - t_i)^2 / sum_i w_i`` over the valid items of all
    lists (``w_i = 1`` by default). It regresses every similarity, so every target
    error is copied into the student.

    Examples:
        >>> loss_fn = SimilarityMSELoss()
        >>> loss = loss_fn(scores=student_cosines, targets=teacher_cosines)
    """

    def forward(
        self,
        *,
        scores: Tensor,
        targets: Tensor,
        weights: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Computes the weighted mean squared error.

        Args:
            scores: Student similarities. Shape: (n,) or (B, n).
            targets: Teacher similarities, without grad. Same shape.
            weights: Optional non-negative item weights (default 1). Same shape.
            mask: Optional bool mask, True = keep. Same shape.

        Returns:
            Scalar loss.

        Raises:
            ValueError: On shape mismatches, non-finite valid values, negative
                weights, a non-bool mask or targets that require grad.
        """
        with torch.autocast(device_type=scores.device.type, enabled=False):
            s, t, w, _ = _as_rows(scores, targets, weights, mask)
            return _weighted_mean((s - t).square(), w, s)


class SimilarityKLLoss(nn.Module):
    """KL divergence between the softmaxed teacher and student similarity lists.

    Every list (row) ``r`` becomes two distributions over its valid items,
    ``p = softmax(t / teacher_temperature)`` and ``q = softmax(s / temperature)``,
    and contributes ``KL(p || q) = sum_j p_j (log p_j - log q_j)``. Rows are
    averaged with weights ``W_r = sum_j w_rj`` (the sum of their item weights, the
    number of valid items by default); the item weights do not enter the
    distributions. A row with one valid item contributes 0.

    Called by :class:`~lightly_cotap.loss.CoTAPLoss`, the whole pair list of a batch
    is one row (a listwise loss, the top-one ListNet loss); on (B, n) input each row
    is its own distribution, e.g. the candidates of one anchor patch.

    Attributes:
        temperature: Softmax temperature of the student scores.
        teacher_temperature: Softmax temperature of the teacher targets.

    Examples:
        >>> loss_fn = SimilarityKLLoss(temperature=0.1)
        >>> loss = loss_fn(scores=student_rows, targets=teacher_rows)  # (B, n)
    """

    def __init__(
        self, temperature: float = 0.1, teacher_temperature: float | None = None
    ) -> None:
        """Initializes the loss.

        Args:
            temperature: Student temperature, > 0.
            teacher_temperature: Teacher temperature, > 0; ``None`` uses
                ``temperature``.

        Raises:
            ValueError: If a temperature is not a finite number > 0.
        """
        super().__init__()
        _check_positive("temperature", temperature)
        if teacher_temperature is None:
            teacher_temperature = temperature
        _check_positive("teacher_temperature", teacher_temperature)
        self.temperature = float(temperature)
        self.teacher_temperature = float(teacher_temperature)

    def forward(
        self,
        *,
        scores: Tensor,
        targets: Tensor,
        weights: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Computes the row-weighted mean of ``KL(p || q)``.

        Args:
            scores: Student similarities. Shape: (n,) or (B, n).
            targets: Teacher similarities, without grad. Same shape.
            weights: Optional non-negative item weights (default 1); a row's
                weight is their sum. Same shape.
            mask: Optional bool mask, True = keep. Same shape.

        Returns:
            Scalar loss.

        Raises:
            ValueError: On shape mismatches, non-finite valid values, negative
                weights, a non-bool mask or targets that require grad.
        """
        with torch.autocast(device_type=scores.device.type, enabled=False):
            s, t, w, valid = _as_rows(scores, targets, weights, mask)
            row_weight = w.sum(dim=1)
            # Rows without valid items are replaced by a dummy valid item (weight 0).
            has_item = valid.any(dim=1, keepdim=True)
            valid = valid | ~has_item
            minus_inf = torch.full_like(s, -math.inf)
            log_q = torch.log_softmax(
                torch.where(valid, s / self.temperature, minus_inf), dim=1
            )
            log_p = torch.log_softmax(
                torch.where(valid, t / self.teacher_temperature, minus_inf), dim=1
            )
            terms = torch.where(
                valid, log_p.exp() * (log_p - log_q), torch.zeros_like(s)
            )
            return _weighted_mean(terms.sum(dim=1), row_weight, s)


class STEGOCorrelationLoss(nn.Module):
    """STEGO's correlation loss [1] on lists of similarities.

    Every valid item contributes ``-(t_i - shift) * max(s_i, 0)`` (``s_i`` unclamped
    with ``clamp_scores=False``), and the loss is the weighted mean over the valid
    items (``w_i = 1`` by default). Pairs whose teacher similarity exceeds ``shift``
    are pulled together, the others pushed apart until the student similarity
    reaches 0. ``shift`` is a decision on the target scale: it says which teacher
    similarities count as attractive. This is STEGO's loss with its ``zero_clamp``
    option and without ``pointwise`` centring or the ``0.8`` clamp of its
    ``stabalize`` option.

    - [1]: Hamilton et al., Unsupervised Semantic Segmentation by Distilling Feature
      Correspondences (STEGO), ICLR 2022, https://arxiv.org/abs/2203.08414

    Attributes:
        shift: Teacher similarity at which a pair turns from repulsive to
            attractive (STEGO's ``b``).
        clamp_scores: Clamp the student similarity at 0 (STEGO's ``zero_clamp``).

    Examples:
        >>> loss_fn = STEGOCorrelationLoss(shift=0.5)
        >>> loss = loss_fn(scores=student_cosines, targets=teacher_cosines)
    """

    def __init__(self, shift: float = 0.5, clamp_scores: bool = True) -> None:
        """Initializes the loss.

        Args:
            shift: Finite shift of the teacher similarities.
            clamp_scores: Clamp student similarities at 0 before the product.

        Raises:
            ValueError: If ``shift`` is not finite.
        """
        super().__init__()
        _check_finite("shift", shift)
        self.shift = float(shift)
        self.clamp_scores = clamp_scores

    def forward(
        self,
        *,
        scores: Tensor,
        targets: Tensor,
        weights: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Computes the weighted mean of ``-(t - shift) * max(s, 0)``.

        Args:
            scores: Student similarities. Shape: (n,) or (B, n).
            targets: Teacher similarities, without grad. Same shape.
            weights: Optional non-negative item weights (default 1). Same shape.
            mask: Optional bool mask, True = keep. Same shape.

        Returns:
            Scalar loss (may be negative).

        Raises:
            ValueError: On shape mismatches, non-finite valid values, negative
                weights, a non-bool mask or targets that require grad.
        """
        with torch.autocast(device_type=scores.device.type, enabled=False):
            s, t, w, _ = _as_rows(scores, targets, weights, mask)
            student = s.clamp_min(0.0) if self.clamp_scores else s
            return _weighted_mean(-(t - self.shift) * student, w, s)


class TopKInfoNCELoss(nn.Module):
    """InfoNCE with the teacher's ``top_k`` items of every list as positives.

    In every list the ``min(top_k, n_valid)`` valid items with the highest targets
    are positives ``P`` (ties broken towards the lower index), the other valid items
    negatives ``N``. Every positive ``p`` is contrasted against the negatives:

        ``l_p = -log( exp(s_p / T) / (exp(s_p / T) + sum_{j in N} exp(s_j / T)) )``

    and the loss is ``sum_p w_p l_p / sum_p w_p`` over the positives of all lists
    (``w_p = 1`` by default). ``top_k`` is a decision: it says how many items of a
    list are treated as correct correspondences, whatever their targets are.

    Attributes:
        top_k: Positives per list.
        temperature: Softmax temperature ``T``.

    Examples:
        >>> loss_fn = TopKInfoNCELoss(top_k=100, temperature=0.1)
        >>> loss = loss_fn(scores=student_cosines, targets=teacher_cosines)
    """

    def __init__(self, top_k: int, temperature: float = 0.1) -> None:
        """Initializes the loss.

        Args:
            top_k: Number of positives per list, >= 1.
            temperature: Softmax temperature, > 0.

        Raises:
            ValueError: If ``top_k`` < 1 or ``temperature`` is not a finite
                number > 0.
        """
        super().__init__()
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got top_k={top_k!r}.")
        _check_positive("temperature", temperature)
        self.top_k = top_k
        self.temperature = float(temperature)

    def forward(
        self,
        *,
        scores: Tensor,
        targets: Tensor,
        weights: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Computes the weighted mean of ``l_p`` over the positives.

        Args:
            scores: Student similarities. Shape: (n,) or (B, n).
            targets: Teacher similarities, without grad. Same shape.
            weights: Optional non-negative item weights (default 1); only the
                positives' weights are used. Same shape.
            mask: Optional bool mask, True = keep. Same shape.

        Returns:
            Scalar loss.

        Raises:
            ValueError: On shape mismatches, non-finite valid values, negative
                weights, a non-bool mask or targets that require grad.
        """
        with torch.autocast(device_type=scores.device.type, enabled=False):
            s, t, w, valid = _as_rows(scores, targets, weights, mask)
            positive = top_k_mask(t, valid, self.top_k)
            negative = valid & ~positive
            logits = s / self.temperature
            minus_inf = torch.full_like(logits, -math.inf)
            negatives = torch.logsumexp(
                torch.where(negative, logits, minus_inf), dim=1, keepdim=True
            )
            per_item = torch.logaddexp(logits, negatives) - logits
            per_item = torch.where(positive, per_item, torch.zeros_like(per_item))
            return _weighted_mean(per_item, torch.where(positive, w, 0.0 * w), s)


def top_k_mask(targets: Tensor, valid: Tensor, k: int) -> Tensor:
    """The ``min(k, n_valid)`` valid items with the highest targets of every row.

    Args:
        targets: Shape: (B, n).
        valid: Bool mask of the items that may be chosen. Shape: (B, n).
        k: Items per row.

    Returns:
        Bool mask. Ties are broken towards the lower index. Shape: (B, n).
    """
    keyed = torch.where(valid, targets, torch.full_like(targets, -math.inf))
    order = torch.sort(keyed, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(
        1, order, torch.arange(targets.shape[1], device=order.device).expand_as(order)
    )
    return valid & (rank < k)


class BinaryAPLoss(nn.Module):
    """Smoothed AP loss on thresholded targets: the decision-dependent variant.

    Targets become binary labels ``y_i = 1[t_i >= threshold]``, and the loss is
    :class:`~lightly_cotap.loss.ContinuousAPLoss` on ``y`` with anchor weights
    ``w_i * y_i`` (``w_i = 1`` by default). On binary targets ``ContinuousAPLoss``'s
    ``NEG_i`` is ``sum_{j: y_j = 0} phi_tau(s_i - s_j)`` and ``POS_i`` the number of
    positives ranked at least as high as ``i``, so with ``kappa = 1`` every positive
    anchor contributes the smoothed ``1 - precision@i = NEG_i / (POS_i + NEG_i)``
    and, with uniform weights, the loss is the smoothed ``1 - AP`` (exactly
    ``1 - AP`` with the step in place of ``phi_tau``). Negative anchors contribute
    nothing. ``threshold`` is the decision that ``ContinuousAPLoss`` avoids.

    Attributes:
        threshold: Targets ``>= threshold`` are positives.
        ranking: The :class:`ContinuousAPLoss` applied to the binary targets.

    Examples:
        >>> loss_fn = BinaryAPLoss(threshold=0.5)
        >>> loss = loss_fn(scores=student_cosines, targets=teacher_cosines)
    """

    def __init__(
        self,
        threshold: float = 0.5,
        tau: float = 0.5,
        kappa: float = 1.0,
        method: str = "auto",
    ) -> None:
        """Initializes the loss.

        Args:
            threshold: Finite threshold on the targets.
            tau: Margin of the surrogate (see ``ContinuousAPLoss``).
            kappa: Multiplier of ``NEG / POS`` (see ``ContinuousAPLoss``).
            method: ``"auto"``, ``"dense"`` or ``"fast"`` (see ``ContinuousAPLoss``).

        Raises:
            ValueError: If an argument is out of range.
        """
        super().__init__()
        _check_finite("threshold", threshold)
        self.threshold = float(threshold)
        self.ranking = ContinuousAPLoss(tau=tau, kappa=kappa, method=method)

    def forward(
        self,
        *,
        scores: Tensor,
        targets: Tensor,
        weights: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Computes the smoothed AP loss of the thresholded targets.

        Args:
            scores: Student similarities. Shape: (n,) or (B, n).
            targets: Teacher similarities, without grad. Same shape.
            weights: Optional non-negative anchor weights (default 1); only the
                positives' weights are used. Same shape.
            mask: Optional bool mask, True = keep. Same shape.

        Returns:
            Scalar loss.

        Raises:
            ValueError: On shape mismatches, non-finite valid values, negative
                weights, a non-bool mask or targets that require grad.
        """
        validate_list_inputs(scores=scores, targets=targets, weights=weights, mask=mask)
        labels = (targets.detach() >= self.threshold).to(scores.dtype)
        anchor_weights = labels if weights is None else weights.detach() * labels
        loss: Tensor = self.ranking(
            scores=scores, targets=labels, weights=anchor_weights, mask=mask
        )
        return loss


class HingeContinuousAPLoss(ContinuousAPLoss):
    """:class:`~lightly_cotap.loss.ContinuousAPLoss` with the hinge surrogate.

    Identical to ``ContinuousAPLoss`` (``NEG``, ``POS``, ``u = kappa NEG / POS``,
    ``l = u / (1 + u)``, weights ``(t - weight_offset)_+``, the dense and the
    ``O(n log^2 n)`` paths) except that the step ``1[s_j >= s_i]`` in
    ``NEG_i = sum_j (t_i - t_j)_+ phi(s_i - s_j)`` is smoothed by the hinge
    ``phi(x) = max(0, 1 - x/tau) = max(0, tau + s_j - s_i) / tau`` instead of the
    Huber-like ``phi_tau``. Both equal 1 at ``x = 0`` and 0 from ``x = tau`` on; the
    hinge is linear in between (the Huber-like one quadratic, with a continuous
    slope) and grows with slope ``1/tau`` instead of ``2/tau`` for ``x < 0``, so a
    badly mis-ranked item weighs half as much per unit of score.

    Attributes:
        tau: Margin of the hinge.
        kappa: Multiplier of ``NEG / POS``.
        weight_offset: ``delta`` of the default anchor weights ``(t - delta)_+``.
        method: ``"auto"`` (default), ``"dense"`` or ``"fast"``.
        dense_max_pairs: Largest ``B * n * n`` for which ``"auto"`` is dense.

    Examples:
        >>> loss_fn = HingeContinuousAPLoss()
        >>> loss = loss_fn(scores=student_cosines, targets=teacher_cosines)
    """

    _surrogate = "hinge"
