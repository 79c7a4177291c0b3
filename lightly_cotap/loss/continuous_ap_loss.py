"""Noise-tolerant ranking loss: average precision extended to continuous targets."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightly_cotap.loss._ranking_ops import (
    SURROGATES,
    dense_negatives_and_positives,
    fast_negatives_and_positives,
)
from lightly_cotap.loss.value_checks import value_checks_enabled

_METHODS = ("auto", "dense", "fast")

#: ``method="auto"`` on the CPU (and devices other than CUDA): the dense path up to
#: this many pair entries ``B * n * n``, the measured CPU crossover (n = 512 for one
#: list; ``benchmarks/continuous_ap_loss.py``).
CPU_DENSE_MAX_PAIRS = 2**18

#: Tensors of ``(B, n, n)`` elements the dense path holds at its peak in forward
#: plus backward (measured: 38 bytes per pair entry in float32).
DENSE_TENSORS_PER_PAIR = 10

#: ``method="auto"`` on CUDA: the dense path while its peak memory stays within this
#: fraction of the device's memory. A GPU runs the ``(B, n, n)`` element-wise work
#: at memory bandwidth while the sort-based path is a sequence of ``O(log n)``
#: small kernels, so the dense path is expected to be the faster one for as long as
#: it fits; the rest of the memory stays free for the training step's activations.
CUDA_DENSE_MEMORY_FRACTION = 0.25


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
    are long: on the CPU above 512 items, on CUDA when the dense path would take more
    than a quarter of the device memory (:func:`default_dense_max_pairs`). Both agree
    to floating-point precision for values and gradients, including ties in ``s``
    and in ``t``. On accelerators neither reads a value from the device, so the loss
    runs without host synchronisation (on the CPU, where reading a value costs
    nothing, the sort-based path reads the number of distinct targets to skip
    levels for tied targets); the value checks (NaN / inf, negative weights) are off
    unless turned on with :func:`lightly_cotap.loss.value_checks`.

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
            number of pair entries ``B * n * n`` is at most this value; None
            (default) chooses it per device with :func:`default_dense_max_pairs`.

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
        dense_max_pairs: int | None = None,
    ) -> None:
        """Initializes the ContinuousAPLoss with the specified parameters.

        Args:
            tau: Margin of the Huber surrogate, > 0.
            kappa: Multiplier of ``NEG / POS``, > 0.
            weight_offset: Offset ``delta`` of the default weights ``(t - delta)_+``.
            method: ``"auto"``, ``"dense"`` or ``"fast"``.
            dense_max_pairs: Largest ``B * n * n`` for which ``"auto"`` uses the dense
                path, >= 0, or None for the device's default.

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
        if dense_max_pairs is not None and dense_max_pairs < 0:
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
            ValueError: On shape mismatches, a non-boolean mask, or targets that
                require grad; with :func:`~lightly_cotap.loss.value_checks` on, also
                on non-finite values among the valid items or negative weights
                (without the checks, a non-finite valid score or target gives a
                NaN loss).
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
            neg, pos = self._negatives_and_positives(s, t, valid)
            u = self.kappa * neg / pos
            per_anchor = u / (1.0 + u)
            # All weights zero: the numerator is a zero of the graph; divide by 1.
            total_weight = w.sum()
            total_weight = torch.where(
                total_weight > 0, total_weight, torch.ones_like(total_weight)
            )
            return (w * per_anchor).sum() / total_weight

    def uses_dense(self, scores: Tensor) -> bool:
        """Whether ``forward(scores=scores, ...)`` takes the dense path.

        Args:
            scores: Scores as passed to ``forward``. Shape: (n,) or (B, n).
        """
        if self.method != "auto":
            return self.method == "dense"
        rows, items = (1, scores.shape[0]) if scores.dim() == 1 else scores.shape[:2]
        limit = self.dense_max_pairs
        if limit is None:
            dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
            limit = default_dense_max_pairs(scores.device, dtype)
        return rows * items * items <= limit

    def _negatives_and_positives(
        self, s: Tensor, t: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor]:
        """NEG and POS of all items, shape (B, n); POS is 1 for invalid anchors."""
        if self.uses_dense(s):
            neg, pos = dense_negatives_and_positives(
                s, t, valid, self.tau, surrogate=SURROGATES[self._surrogate]
            )
            # Invalid anchors have w = 0 and POS = 0; avoid 0/0 in their l_i.
            pos = torch.where(valid, pos, torch.ones_like(pos))
            return neg, pos
        num_rows, num_items = s.shape
        # Invalid items (s = t = 0) form one extra list of their own: they meet no
        # valid item, and no boolean selection (whose size the host would have to
        # read from the device) is needed. Their POS counts their ties, >= 1.
        rows = torch.arange(num_rows, device=s.device)[:, None].expand_as(s)
        rows = torch.where(valid, rows, num_rows)
        fast_dtype = torch.float32 if s.device.type == "mps" else torch.float64
        neg, pos = fast_negatives_and_positives(
            s.reshape(-1).to(fast_dtype),
            t.reshape(-1).to(fast_dtype),
            rows.reshape(-1),
            self.tau,
            surrogate=self._surrogate,
            # On the CPU, reading the number of distinct targets costs nothing and
            # saves levels for tied targets; elsewhere it would stall the device.
            row_length=None if s.device.type == "cpu" else num_items,
        )
        return neg.to(s.dtype).view_as(s), pos.to(s.dtype).view_as(s)


def default_dense_max_pairs(device: torch.device, dtype: torch.dtype) -> int:
    """Largest ``B * n * n`` for which ``method="auto"`` takes the dense path.

    On CUDA: as many pair entries as fit into :data:`CUDA_DENSE_MEMORY_FRACTION` of
    the device's memory at :data:`DENSE_TENSORS_PER_PAIR` elements of ``dtype``
    each (a constant of the device, read once, so the choice never waits for the
    device). Elsewhere: :data:`CPU_DENSE_MAX_PAIRS`.

    Args:
        device: Device of the scores.
        dtype: Compute dtype of the loss (float32 or float64).
    """
    if device.type != "cuda":
        return CPU_DENSE_MAX_PAIRS
    index = device.index if device.index is not None else torch.cuda.current_device()
    bytes_per_pair = DENSE_TENSORS_PER_PAIR * dtype.itemsize
    return int(CUDA_DENSE_MEMORY_FRACTION * _cuda_total_memory(index) / bytes_per_pair)


_CUDA_TOTAL_MEMORY: dict[int, int] = {}


def _cuda_total_memory(index: int) -> int:
    """Total memory of a CUDA device in bytes (read once per device)."""
    if index not in _CUDA_TOTAL_MEMORY:
        properties = torch.cuda.get_device_properties(index)
        _CUDA_TOTAL_MEMORY[index] = int(properties.total_memory)
    return _CUDA_TOTAL_MEMORY[index]


def validate_list_inputs(
    *, scores: Tensor, targets: Tensor, weights: Tensor | None, mask: Tensor | None
) -> None:
    """Raises ValueError for lists a list criterion cannot score.

    Shared by :class:`ContinuousAPLoss` and the criteria of
    :mod:`lightly_cotap.loss.correspondence_criteria`: ``scores`` floating point of
    shape (n,) or (B, n); ``targets``, ``weights`` and ``mask`` of the same shape;
    targets without grad; a bool mask. Finite values and non-negative weights among
    the valid items are checked only with value checks on
    (:func:`~lightly_cotap.loss.value_checks`).

    Args:
        scores: Scores of the list. Shape: (n,) or (B, n).
        targets: Continuous targets. Same shape.
        weights: Optional anchor weights. Same shape.
        mask: Optional bool validity mask. Same shape.

    Raises:
        ValueError: If a shape, dtype or (with value checks) a value is invalid.
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
    if not value_checks_enabled():
        return
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
