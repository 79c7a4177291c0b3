"""Leopart-style cross-crop patch cluster prediction loss (used by CoTAP)."""

from __future__ import annotations

import torch
from lightly.utils import dist
from torch import Tensor, nn

from lightly_cotap.transforms.crop_alignment import (
    crop_pair_grid_boxes,
    resample_crop_features,
)


class PatchClusterLoss(nn.Module):
    """Implementation of the cross-crop patch cluster loss of Leopart [0] as used in
    CoTAP [1].

    For every teacher global crop ``c`` and every other crop ``v`` (global or
    local) of the same image, the teacher's Sinkhorn codes of crop ``c`` and the
    student's prototype scores of crop ``v`` are RoI-aligned onto an
    ``output_size x output_size`` grid over the intersection of the two crops
    (:func:`~lightly_cotap.transforms.crop_alignment.crop_pair_grid_boxes`,
    Lightly's ``roi_resample_to_grid``). The student's aligned scores go through
    ``log_softmax(. / temperature)`` and the cross-entropy ``-sum_k q_k log p_k``
    is averaged over the aligned cells where the RoI-aligned teacher foreground
    mask of crop ``c`` is ``>= fg_threshold`` (default 1: the cell lies entirely
    in the foreground, as in the official code; use e.g. 0.5 for a majority
    vote). The per-pair means are averaged over the ``V - 1`` other crops and over
    the teacher crops. Pairs of crops that do not overlap are skipped.

    This follows ``InnerSampleLoss.forward_patch`` of the authors' code [2] (which
    adapts Leopart), with inputs that carry an explicit crop axis so that masks,
    codes and boxes cannot be paired with the wrong crop.

    The teacher codes are typically computed with
    :class:`~lightly_cotap.loss.SinkhornCodes` (patch temperature 0.05, queue of
    foreground teacher patch scores). With ``gather_distributed=True`` the number
    of kept cells is summed over all processes, so that the mean of the per-rank
    losses equals the loss of the concatenated batch (the codes are made
    distributed by ``SinkhornCodes``).

    - [0]: Leopart, 2022, https://arxiv.org/abs/2204.13101
    - [1]: Wen et al., Semantic Concentration for Self-Supervised Dense
      Representations Learning, 2025, https://arxiv.org/abs/2509.09429
    - [2]: https://github.com/KID-7391/CoTAP (``losses/inner_sample.py``)

    Attributes:
        temperature: Student softmax temperature.
        output_size: Side of the RoI-aligned grid.
        fg_threshold: Minimum aligned foreground value of a kept cell.
        gather_distributed: Normalise by the kept cells of all processes.

    Examples:
        >>> loss_fn = PatchClusterLoss()
        >>> loss = loss_fn(
        ...     teacher_codes=codes,          # (B, 2, 14, 14, 512)
        ...     student_global=s_global,      # (B, 2, 14, 14, 512)
        ...     student_local=s_local,        # (B, 4, 6, 6, 512)
        ...     crop_boxes=views["boxes"],    # (B, 6, 4)
        ...     fg_mask=teacher_fg,           # (B, 2, 14, 14)
        ... )
    """

    def __init__(
        self,
        temperature: float = 0.1,
        output_size: int = 6,
        fg_threshold: float = 1.0,
        gather_distributed: bool = False,
    ) -> None:
        """Initializes the PatchClusterLoss with the specified parameters.

        Args:
            temperature: Student softmax temperature, > 0.
            output_size: Side of the RoI-aligned grid, >= 1.
            fg_threshold: Threshold in [0, 1] of the aligned foreground mask.
            gather_distributed: Sum the number of kept cells over processes.

        Raises:
            ValueError: If an argument is out of range, or ``gather_distributed`` is
                set and torch.distributed is not available.
        """
        super().__init__()
        if not abs(temperature) > 1e-8 or temperature < 0:
            raise ValueError(f"temperature must be > 0, got temperature={temperature}.")
        if output_size < 1:
            raise ValueError(
                f"output_size must be >= 1, got output_size={output_size}."
            )
        if not 0.0 <= fg_threshold <= 1.0:
            raise ValueError(
                f"fg_threshold must be in [0, 1], got fg_threshold={fg_threshold}."
            )
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError(
                "gather_distributed is True but torch.distributed is not available. "
                "Please set gather_distributed=False or install a torch distribution "
                "with distributed support."
            )
        self.temperature = float(temperature)
        self.output_size = output_size
        self.fg_threshold = float(fg_threshold)
        self.gather_distributed = gather_distributed

    def forward(
        self,
        *,
        teacher_codes: Tensor,
        student_global: Tensor,
        crop_boxes: Tensor,
        student_local: Tensor | None = None,
        fg_mask: Tensor | None = None,
        flipped: Tensor | None = None,
    ) -> Tensor:
        """Computes the loss.

        Args:
            teacher_codes: Teacher Sinkhorn codes of the G global crops (rows sum to
                1 over K). Shape: (B, G, h, w, K).
            student_global: Student prototype scores of the global crops.
                Shape: (B, G, h, w, K).
            crop_boxes: Boxes ``(x0, y0, x1, y1)`` of all ``V = G + L`` crops in
                original-image pixels, globals first (``CoTAPTransform``'s
                ``boxes``). Shape: (B, V, 4).
            student_local: Student prototype scores of the L local crops, or None.
                Shape: (B, L, h_l, w_l, K).
            fg_mask: Teacher foreground mask of the global crops (bool or float in
                [0, 1]); None keeps every cell. Shape: (B, G, h, w).
            flipped: Horizontal-flip flags of the crops (``CoTAPTransform``'s
                ``flipped``), or None. Shape: (B, V).

        Returns:
            Scalar loss.

        Raises:
            ValueError: If the shapes do not match.
        """
        _validate(
            teacher_codes=teacher_codes,
            student_global=student_global,
            student_local=student_local,
            crop_boxes=crop_boxes,
            fg_mask=fg_mask,
            flipped=flipped,
        )
        b, g, h, w, _ = student_global.shape
        num_local = 0 if student_local is None else student_local.shape[1]
        num_crops = g + num_local
        if num_crops < 2:
            return student_global.sum() * 0.0
        dtype = (
            torch.float64 if student_global.dtype == torch.float64 else torch.float32
        )
        with torch.autocast(device_type=student_global.device.type, enabled=False):
            total = self._sum_over_pairs(
                teacher_codes=teacher_codes.detach().to(dtype),
                student_global=student_global.to(dtype),
                student_local=None
                if student_local is None
                else student_local.to(dtype),
                crop_boxes=crop_boxes,
                fg_mask=fg_mask,
                flipped=flipped,
            )
        return total / (g * (num_crops - 1))

    def _sum_over_pairs(
        self,
        *,
        teacher_codes: Tensor,
        student_global: Tensor,
        student_local: Tensor | None,
        crop_boxes: Tensor,
        fg_mask: Tensor | None,
        flipped: Tensor | None,
    ) -> Tensor:
        """Sum over (teacher crop, other crop) pairs of the masked mean CE."""
        b, g, h, w, _ = student_global.shape
        num_crops = g + (0 if student_local is None else student_local.shape[1])
        size = self.output_size
        mask = (
            torch.ones(
                b, g, h, w, device=teacher_codes.device, dtype=teacher_codes.dtype
            )
            if fg_mask is None
            else fg_mask.detach().to(teacher_codes.dtype)
        )
        total = student_global.new_zeros(())
        for c in range(g):
            for v in range(num_crops):
                if v == c:
                    continue
                student = (
                    student_global[:, v] if v < g else student_local[:, v - g]  # type: ignore[index]
                )
                box_c, box_v, valid = crop_pair_grid_boxes(
                    crop_boxes, c, v, (h, w), tuple(student.shape[1:3]), flipped
                )
                flip_c = None if flipped is None else flipped[:, c]
                flip_v = None if flipped is None else flipped[:, v]
                q = resample_crop_features(
                    teacher_codes[:, c], box_c, size, size, flip_c
                )
                keep = resample_crop_features(
                    mask[:, c, ..., None], box_c, size, size, flip_c
                )[..., 0]
                keep = (keep >= self.fg_threshold - 1e-6) & valid[:, None]
                logits = resample_crop_features(student, box_v, size, size, flip_v)
                log_p = torch.log_softmax(logits / self.temperature, dim=-1)
                cross_entropy = -(q * log_p).sum(dim=-1)  # (B, size * size)
                kept = keep.to(cross_entropy.dtype)
                count = kept.sum().detach()
                if self.gather_distributed and _world_size() > 1:
                    count = count.clone()
                    # lightly.utils.dist has no all_reduce.
                    torch.distributed.all_reduce(count)
                    count = count / _world_size()
                total = total + (cross_entropy * kept).sum() / count.clamp_min(1.0)
        return total


def _world_size() -> int:
    return int(dist.world_size())


def _validate(
    *,
    teacher_codes: Tensor,
    student_global: Tensor,
    student_local: Tensor | None,
    crop_boxes: Tensor,
    fg_mask: Tensor | None,
    flipped: Tensor | None,
) -> None:
    """Raises ValueError for inputs the loss cannot use."""
    if student_global.dim() != 5:
        raise ValueError(
            "student_global must have shape (B, G, h, w, K), got "
            f"{tuple(student_global.shape)}."
        )
    if teacher_codes.shape != student_global.shape:
        raise ValueError(
            f"teacher_codes must have the shape of student_global "
            f"{tuple(student_global.shape)}, got {tuple(teacher_codes.shape)}."
        )
    b, g, h, w, k = student_global.shape
    num_crops = g
    if student_local is not None:
        if (
            student_local.dim() != 5
            or student_local.shape[0] != b
            or student_local.shape[4] != k
        ):
            raise ValueError(
                f"student_local must have shape (B, L, h_l, w_l, K) = ({b}, L, h_l, "
                f"w_l, {k}), got {tuple(student_local.shape)}."
            )
        num_crops += student_local.shape[1]
    if tuple(crop_boxes.shape) != (b, num_crops, 4):
        raise ValueError(
            f"crop_boxes must have shape (B, V, 4) = {(b, num_crops, 4)} with V = G + "
            f"L crops, got {tuple(crop_boxes.shape)}."
        )
    if fg_mask is not None and tuple(fg_mask.shape) != (b, g, h, w):
        raise ValueError(
            f"fg_mask must have shape (B, G, h, w) = {(b, g, h, w)}, got "
            f"{tuple(fg_mask.shape)}."
        )
    if flipped is not None and tuple(flipped.shape) != (b, num_crops):
        raise ValueError(
            f"flipped must have shape (B, V) = {(b, num_crops)}, got "
            f"{tuple(flipped.shape)}."
        )
