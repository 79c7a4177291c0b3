"""CoTAP correspondence loss: continuous-target AP ranking of cross-image patch pairs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from lightly.models.utils import get_at_index
from lightly.utils import dist
from torch import Tensor, nn

from lightly_cotap.loss.continuous_ap_loss import ContinuousAPLoss
from lightly_cotap.loss.cotap_cells import (
    draw_negative_images,
    pair_similarities,
    pool_cells,
    select_foreground_cells,
)
from lightly_cotap.loss.value_checks import value_checks_enabled


class CoTAPLoss(nn.Module):
    """Implementation of the CoTAP patch-correspondence loss from the CoTAP paper [0].

    The loss distils the teacher's patch correspondences between an image ``x`` and a
    semantically similar neighbour image ``x+`` into the student. For every pooling
    size ``p`` in ``pool_sizes``:

    1. The patch-head outputs of every crop are average-pooled to ``p x p`` cells and
       the cells of the ``V`` crops of an image are concatenated (``V * p * p`` cells).
    2. The teacher foreground mask is pooled the same way and the ``top_k`` cells
       with the highest foreground fraction are kept per image, separately for ``x``
       and for ``x+``. Ties (e.g. many fully-foreground cells) are broken at random
       when ``random_tie_break`` is True.
    3. Pairs: every kept cell of ``x`` against every kept cell of its own ``x+``
       (``top_k ** 2`` positive pairs) and against the kept cells of the ``x+`` of
       ``num_negatives`` *other* images of the batch (``num_negatives * top_k ** 2``
       negative pairs). The other images are drawn by a random derangement: a random
       cyclic order of the batch in which image ``b`` takes the ``num_negatives``
       images that follow it, so they are distinct, never ``b`` itself, and every
       ``x+`` serves as a negative equally often.
    4. Student cosine similarities of the pairs are the scores, teacher cosine
       similarities the targets, and the anchor weights are
       ``(t - weight_offset)_+ * (1 for own-pair, negative_weight for other-image
       pairs)``. All pairs of the batch are ranked as ONE list by the ``criterion``,
       by default :class:`~lightly_cotap.loss.ContinuousAPLoss` (``n = B * top_k**2
       * (1 + num_negatives)`` items), as in the code of the authors [1].

    The result is averaged over the pooling sizes.

    The criterion is exchangeable: any module called as
    ``criterion(scores=..., targets=..., weights=...)`` (the keyword signature of
    :class:`~lightly_cotap.loss.ContinuousAPLoss`, see
    :class:`~lightly_cotap.loss.correspondence_criteria.CorrespondenceCriterion`)
    that returns a scalar. Per pooling size ``CoTAPLoss`` calls it once with

    - ``scores``: the student cosines, shape ``(n,)``, one flattened list in
      ``(image b, pair image r, cell i of x, cell j of x+)`` order (``r = 0`` is
      the own ``x+``, ``r >= 1`` the other images), float32 (float64 for float64
      inputs), differentiable;
    - ``targets``: the teacher cosines of the same pairs, shape ``(n,)``, detached;
    - ``weights``: the non-negative anchor weights above, shape ``(n,)``;
    - no ``mask`` (every pair of the list is valid).

    :mod:`lightly_cotap.loss.correspondence_criteria` holds alternatives (MSE, KL
    of softmaxed lists, STEGO's correlation loss, top-k InfoNCE, binary AP on
    thresholded targets, the hinge surrogate of the ranking loss).

    Inputs carry an explicit crop axis, ``(B, V, ...)``, for features *and* masks so
    that a mask can never be paired with the wrong image or crop. (The authors' code
    reshapes the mask in a different order than the features; this implementation
    pairs image ``b`` / crop ``v`` of the features with image ``b`` / crop ``v`` of
    the mask.)

    Differences from the authors' code [1], all documented choices:

    - The ``num_negatives`` other images of an anchor are distinct (one random cyclic
      order) instead of ``num_negatives`` independent derangements that may repeat an
      image. If the batch has ``B <= num_negatives`` images, ``B - 1`` negatives are
      used (none for ``B = 1``).
    - Ties in the pooled foreground score are broken at random instead of by the
      (unspecified) order of ``torch.topk``, which on binary masks favours the first
      cells of the first crop.
    - ``ContinuousAPLoss`` drops the ``1e-5`` stabilisers (see its docstring).

    With ``gather_distributed=True`` the selected cells of all ranks are gathered
    with :func:`lightly.utils.dist.gather` (gradients flow back to their rank), the
    derangement is drawn on rank 0 and broadcast, and every rank ranks the SAME
    global list of the whole distributed batch: negatives come from the ``x+`` of
    images on any rank, and the loss equals the single-process loss on the
    concatenated batch (all ranks must have the same batch size). DDP's gradient
    averaging then yields the gradient of that global loss. The list is
    ``world_size`` times longer, and each rank computes it (the ranking uses
    ``ContinuousAPLoss``'s ``O(n log^2 n)`` path for long lists).

    - [0]: Wen et al., Semantic Concentration for Self-Supervised Dense
      Representations Learning, 2025, https://arxiv.org/abs/2509.09429
    - [1]: https://github.com/KID-7391/CoTAP (``losses/intra_sample.py``)

    Attributes:
        pool_sizes: Cell grid sizes; features and masks are pooled to ``p x p``.
        top_k: Foreground cells kept per image and pooling size.
        num_negatives: Other images whose ``x+`` cells serve as negatives.
        negative_weight: Factor on the anchor weight of other-image pairs.
        random_tie_break: Break ties of the foreground score at random.
        gather_distributed: Rank one list over the batches of all ranks.
        weight_offset: Anchor weights are ``(t - weight_offset)_+``.
        criterion: The module that scores the list (default
            :class:`ContinuousAPLoss`).

    Examples:
        >>> loss_fn = CoTAPLoss()
        >>> # patch-head outputs of the 2 global crops of x and of x+ (B images)
        >>> student_x = torch.randn(8, 2, 14, 14, 512, requires_grad=True)
        >>> loss = loss_fn(
        ...     student_x=student_x,
        ...     student_pos=student_pos,
        ...     teacher_x=teacher_x,
        ...     teacher_pos=teacher_pos,
        ...     fg_mask_x=fg_x,  # (8, 2, 14, 14) bool
        ...     fg_mask_pos=fg_pos,
        ... )
    """

    def __init__(
        self,
        pool_sizes: Sequence[int] = (7, 14),
        top_k: int = 5,
        num_negatives: int = 5,
        negative_weight: float = 0.1,
        tau: float = 0.5,
        kappa: float = 1.0,
        weight_offset: float = -0.2,
        random_tie_break: bool = True,
        gather_distributed: bool = False,
        criterion: nn.Module | None = None,
    ) -> None:
        """Initializes the CoTAPLoss with the specified parameters.

        Args:
            pool_sizes: Non-empty sequence of positive cell-grid sizes. Each must not
                exceed the feature grid passed to ``forward``.
            top_k: Number of foreground cells kept per image, >= 1 (clamped to the
                number of cells).
            num_negatives: Number of other images used as negatives, >= 0 (clamped
                to ``B - 1``).
            negative_weight: Anchor-weight factor of other-image pairs, >= 0.
            tau: Margin of the ranking surrogate of the default criterion (see
                ``ContinuousAPLoss``).
            kappa: Multiplier of ``NEG / POS`` of the default criterion (see
                ``ContinuousAPLoss``).
            weight_offset: Anchor weights are ``(t - weight_offset)_+``.
            random_tie_break: Break ties of the pooled foreground score at random.
            gather_distributed: Gather the selected cells of all ranks and rank one
                global list.
            criterion: Module that scores the list of pairs, called as
                ``criterion(scores=, targets=, weights=)`` (see the class
                docstring). ``None`` builds ``ContinuousAPLoss(tau=tau,
                kappa=kappa, weight_offset=weight_offset)``; a given criterion is
                configured on its own, so ``tau`` and ``kappa`` must then keep their
                defaults.

        Raises:
            ValueError: If an argument is out of range, ``criterion`` is not an
                ``nn.Module`` or comes with non-default ``tau`` / ``kappa``, or
                ``gather_distributed`` is set and torch.distributed is not
                available.
        """
        super().__init__()
        sizes = tuple(pool_sizes)
        if len(sizes) == 0 or any(
            not isinstance(p, int) or isinstance(p, bool) or p < 1 for p in sizes
        ):
            raise ValueError(
                "pool_sizes must be a non-empty sequence of positive ints, got "
                f"pool_sizes={pool_sizes!r}."
            )
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got top_k={top_k}.")
        if num_negatives < 0:
            raise ValueError(
                f"num_negatives must be >= 0, got num_negatives={num_negatives}."
            )
        if not negative_weight >= 0:
            raise ValueError(
                f"negative_weight must be >= 0, got negative_weight={negative_weight}."
            )
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError(
                "gather_distributed is True but torch.distributed is not available. "
                "Please set gather_distributed=False or install a torch distribution "
                "with distributed support."
            )
        if not math.isfinite(weight_offset):
            raise ValueError(
                f"weight_offset must be a finite number, got weight_offset={weight_offset!r}."
            )
        if criterion is not None and not isinstance(criterion, nn.Module):
            raise ValueError(
                "criterion must be an nn.Module called as criterion(scores=, "
                f"targets=, weights=), got {type(criterion).__name__}."
            )
        if criterion is not None and (tau != 0.5 or kappa != 1.0):
            raise ValueError(
                "tau and kappa configure the default ContinuousAPLoss; with a "
                f"criterion ({type(criterion).__name__}) set them on the criterion, "
                f"got tau={tau}, kappa={kappa}."
            )
        self.pool_sizes = sizes
        self.top_k = top_k
        self.num_negatives = num_negatives
        self.negative_weight = float(negative_weight)
        self.random_tie_break = random_tie_break
        self.gather_distributed = gather_distributed
        self.weight_offset = float(weight_offset)
        self.criterion = (
            ContinuousAPLoss(tau=tau, kappa=kappa, weight_offset=weight_offset)
            if criterion is None
            else criterion
        )

    def forward(
        self,
        *,
        student_x: Tensor,
        student_pos: Tensor,
        teacher_x: Tensor,
        teacher_pos: Tensor,
        fg_mask_x: Tensor,
        fg_mask_pos: Tensor,
    ) -> Tensor:
        """Computes the CoTAP loss of a batch of (x, x+) pairs.

        Args:
            student_x: Student patch-head outputs of the crops of ``x``.
                Shape: (B, V, h, w, K).
            student_pos: Student patch-head outputs of the crops of the neighbour
                ``x+`` of each ``x``. Shape: (B, V, h, w, K).
            teacher_x: Teacher patch-head outputs of the crops of ``x`` (no
                gradient is taken). Shape: (B, V, h, w, K).
            teacher_pos: Teacher patch-head outputs of the crops of ``x+``.
                Shape: (B, V, h, w, K).
            fg_mask_x: Teacher foreground mask of the crops of ``x``, bool or float
                in [0, 1]. Shape: (B, V, h, w).
            fg_mask_pos: Teacher foreground mask of the crops of ``x+``.
                Shape: (B, V, h, w).

        Returns:
            Scalar loss, the mean over ``pool_sizes`` of the ranking loss.

        Raises:
            ValueError: If shapes do not match, a pooling size exceeds the feature
                grid or (with ``gather_distributed``) the ranks hold different batch
                sizes; with :func:`~lightly_cotap.loss.value_checks` on, also if
                values are not finite.
        """
        _validate_inputs(
            student_x=student_x,
            student_pos=student_pos,
            teacher_x=teacher_x,
            teacher_pos=teacher_pos,
            fg_mask_x=fg_mask_x,
            fg_mask_pos=fg_mask_pos,
            pool_sizes=self.pool_sizes,
        )
        if self.gather_distributed and _world_size() > 1:
            _check_same_batch_size(student_x)
        losses = []
        for pool_size in self.pool_sizes:
            index_x = select_foreground_cells(
                fg_mask_x,
                pool_size=pool_size,
                top_k=self.top_k,
                random_tie_break=self.random_tie_break,
            )
            index_pos = select_foreground_cells(
                fg_mask_pos,
                pool_size=pool_size,
                top_k=self.top_k,
                random_tie_break=self.random_tie_break,
            )
            cells = [
                get_at_index(pool_cells(feats, pool_size), index)
                for feats, index in (
                    (student_x, index_x),
                    (student_pos, index_pos),
                    (teacher_x.detach(), index_x),
                    (teacher_pos.detach(), index_pos),
                )
            ]
            if self.gather_distributed and _world_size() > 1:
                cells = [torch.cat(dist.gather(c), dim=0) for c in cells]
            s_x, s_pos, t_x, t_pos = cells
            batch_size = s_x.shape[0]
            negatives = draw_negative_images(
                batch_size=batch_size,
                num_negatives=min(self.num_negatives, batch_size - 1),
                device=s_x.device,
                broadcast=self.gather_distributed and _world_size() > 1,
            )
            scores, is_positive = pair_similarities(
                anchors=s_x, positives=s_pos, negative_index=negatives
            )
            with torch.no_grad():
                targets, _ = pair_similarities(
                    anchors=t_x, positives=t_pos, negative_index=negatives
                )
                weights = (targets - self.weight_offset).clamp_min(0.0)
                weights = weights * torch.where(
                    is_positive,
                    torch.ones_like(weights),
                    torch.full_like(weights, self.negative_weight),
                )
            losses.append(
                self.criterion(
                    scores=scores.flatten(),
                    targets=targets.flatten(),
                    weights=weights.flatten(),
                )
            )
        return torch.stack(losses).mean()


def _world_size() -> int:
    return int(dist.world_size())


def _check_same_batch_size(student_x: Tensor) -> None:
    """Raises ValueError on every rank unless all ranks hold the same batch size.

    Gathering tensors of different lengths is undefined in torch.distributed (gloo
    aborts the process, NCCL may hang), so the sizes are compared first.
    """
    local = torch.tensor([student_x.shape[0]], device=student_x.device)
    sizes = dist.gather(local)
    batch_sizes = [int(size) for size in sizes]
    if len(set(batch_sizes)) > 1:
        raise ValueError(
            "gather_distributed=True needs the same batch size on every rank, got "
            f"batch sizes {batch_sizes} on ranks 0..{len(batch_sizes) - 1} (student_x "
            f"of shape {tuple(student_x.shape)} here); drop the last incomplete "
            "batch or pad the batches to one size."
        )


def _validate_inputs(
    *,
    student_x: Tensor,
    student_pos: Tensor,
    teacher_x: Tensor,
    teacher_pos: Tensor,
    fg_mask_x: Tensor,
    fg_mask_pos: Tensor,
    pool_sizes: tuple[int, ...],
) -> None:
    """Raises ValueError for inputs the loss cannot use."""
    features = {
        "student_x": student_x,
        "student_pos": student_pos,
        "teacher_x": teacher_x,
        "teacher_pos": teacher_pos,
    }
    for name, value in features.items():
        if not isinstance(value, Tensor) or value.dim() != 5:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value)
            raise ValueError(f"{name} must have shape (B, V, h, w, K), got {shape}.")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {value.dtype}.")
        if value.shape != student_x.shape:
            raise ValueError(
                f"{name} must have the shape of student_x {tuple(student_x.shape)}, "
                f"got {tuple(value.shape)}."
            )
    b, v, h, w, _ = student_x.shape
    if b < 1 or v < 1:
        raise ValueError(
            f"student_x must have at least one image and crop, got shape "
            f"{tuple(student_x.shape)}."
        )
    for name, mask in (("fg_mask_x", fg_mask_x), ("fg_mask_pos", fg_mask_pos)):
        if not isinstance(mask, Tensor) or tuple(mask.shape) != (b, v, h, w):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask)
            raise ValueError(
                f"{name} must have shape (B, V, h, w) = {(b, v, h, w)} matching the "
                f"features, got {shape}."
            )
        if (
            value_checks_enabled()
            and mask.is_floating_point()
            and not bool(torch.isfinite(mask).all())
        ):
            raise ValueError(f"{name} contains non-finite values.")
    too_large = [p for p in pool_sizes if p > min(h, w)]
    if too_large:
        raise ValueError(
            f"pool_sizes {pool_sizes} contain sizes {too_large} larger than the "
            f"feature grid (h, w) = {(h, w)}."
        )
