"""The full CoTAP training objective: a weighted sum of separately logged terms.

Over 400 lines: the objective with its input and output containers, which name the
shapes every term expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightly_cotap.loss.cotap_loss import CoTAPLoss
from lightly_cotap.loss.cross_crop_cls_loss import CrossCropClsLoss
from lightly_cotap.loss.cross_image_cls_loss import CrossImageClsLoss
from lightly_cotap.loss.patch_cluster_loss import PatchClusterLoss
from lightly_cotap.loss.sinkhorn_codes import SinkhornCodes


@dataclass
class CoTAPViewOutputs:
    """Student and teacher outputs for the crops of one side (``x`` or ``x+``).

    ``V = G + L`` crops, ordered ``[global_0, ..., global_{G-1}, local_0, ...]`` as in
    :class:`~lightly_cotap.transforms.CoTAPTransform`. The teacher sees only the G
    global crops.

    Attributes:
        student_patch_global: Student patch-head scores of the global crops.
            Shape: (B, G, h, w, K_patch).
        student_cls: Student CLS-head scores of all crops. Shape: (B, V, K_cls).
        teacher_patch: Teacher patch-head scores of the global crops.
            Shape: (B, G, h, w, K_patch).
        teacher_cls: Teacher CLS-head scores of the global crops.
            Shape: (B, G, K_cls).
        fg_mask: Teacher foreground mask of the global crops (bool or float).
            Shape: (B, G, h, w).
        crop_boxes: Boxes of all crops in original-image pixels. Shape: (B, V, 4).
        student_patch_local: Student patch-head scores of the local crops, or None.
            Shape: (B, L, h_l, w_l, K_patch).
        flipped: Horizontal-flip flags of the crops, or None. Shape: (B, V).
    """

    student_patch_global: Tensor
    student_cls: Tensor
    teacher_patch: Tensor
    teacher_cls: Tensor
    fg_mask: Tensor
    crop_boxes: Tensor
    student_patch_local: Tensor | None = None
    flipped: Tensor | None = None


#: Names of the terms, as fields of :class:`CoTAPObjectiveComponents` and keys of
#: ``weights``.
TERM_NAMES = ("cotap", "patch_cluster", "cross_crop_cls", "cross_image_cls")


class CoTAPObjectiveComponents(NamedTuple):
    """The components of :class:`CoTAPObjective`; ``total`` is what ``forward``
    returns.

    Terms with weight 0 are not computed and are None.

    Attributes:
        total: The weighted sum of the computed terms.
        cotap: The CoTAP ranking term (unweighted).
        patch_cluster: The patch cluster term (unweighted).
        cross_crop_cls: The cross-crop CLS term (unweighted).
        cross_image_cls: The cross-image CLS term (unweighted).
    """

    total: Tensor
    cotap: Tensor | None = None
    patch_cluster: Tensor | None = None
    cross_crop_cls: Tensor | None = None
    cross_image_cls: Tensor | None = None

    def terms(self) -> dict[str, Tensor]:
        """Returns the computed terms keyed by :data:`TERM_NAMES` (for logging)."""
        return {
            name: value
            for name in TERM_NAMES
            if (value := getattr(self, name)) is not None
        }


class CoTAPObjective(nn.Module):
    """The CoTAP [0] training objective as a weighted sum of its loss terms.

    Terms (field names of :class:`CoTAPObjectiveComponents`; all weights 1 in the
    paper's code [1]):

    - ``cotap``: :class:`~lightly_cotap.loss.CoTAPLoss`, the continuous-target AP
      ranking of patch correspondences between ``x`` and its neighbour ``x+``
      (official log name ``loss_intra_patch_intra``).
    - ``patch_cluster``: :class:`~lightly_cotap.loss.PatchClusterLoss`, Leopart-style
      cross-crop patch cluster prediction on the crops of ``x`` and of ``x+``
      (``loss_inner_patch_inner``), with teacher codes from
      :class:`~lightly_cotap.loss.SinkhornCodes` (epsilon 0.05, queue of foreground
      teacher patch scores).
    - ``cross_crop_cls``: :class:`~lightly_cotap.loss.CrossCropClsLoss`, CLS
      self-distillation across crops (``loss_inner_cls_inner``), teacher codes from
      a second ``SinkhornCodes`` (epsilon 0.07, CLS queue).
    - ``cross_image_cls``: :class:`~lightly_cotap.loss.CrossImageClsLoss`, CLS
      distillation between ``x`` and ``x+`` (``loss_intra_cls_intra``), same codes.

    The prototype entropy loss of the object-aware filter (``loss_kernel_align``)
    depends on the model's prototypes and bank, not on these outputs; the training
    recipe adds it (see ``lightly_cotap.train``).

    Differences from the authors' setup: one dataset feeds both the patch terms
    and the CLS terms (the official code reads COCO for the patch terms and
    ImageNet for the CLS terms in parallel), so one student forward per crop
    serves all terms. Terms with weight 0 are not computed (nor their Sinkhorn
    codes) and are None in the components.

    Queue sizes are per process. The defaults are the official ones for the 4-GPU
    ViT-S/16 runs: 262,144 / 4 patch scores (+2,048 foreground scores per step) and
    32,768 / 4 CLS scores (+100 per step). Scale them to your batch and number of
    processes.

    ``gather_distributed=True`` makes every term that uses other images of the
    batch distributed: the Sinkhorn normalisations are summed over processes, the
    CoTAP list spans the batches of all processes (negatives from any rank), and
    the patch-cluster normalisation counts the kept cells of all processes. The
    mean over processes of each term then equals the term on the concatenated
    batch (up to the queues, which are per process).

    - [0]: Wen et al., Semantic Concentration for Self-Supervised Dense
      Representations Learning, 2025, https://arxiv.org/abs/2509.09429
    - [1]: https://github.com/KID-7391/CoTAP (``configs/loss_fn/full_loss.yaml``)

    Attributes:
        weights: Weight of each term, keyed by :data:`TERM_NAMES`.
        cotap_loss: The CoTAP ranking loss.
        patch_cluster_loss: The patch cluster loss.
        cross_crop_cls_loss: The cross-crop CLS loss.
        cross_image_cls_loss: The cross-image CLS loss.
        patch_codes: Sinkhorn codes (and queue) of the teacher patch scores.
        cls_codes: Sinkhorn codes (and queue) of the teacher CLS scores.

    Examples:
        >>> objective = CoTAPObjective(patch_prototypes=512, cls_prototypes=4096)
        >>> components = objective.forward_components(x=outputs_x, pos=outputs_pos)
        >>> components.total.backward()
        >>> {name: float(value) for name, value in components.terms().items()}
    """

    def __init__(
        self,
        *,
        patch_prototypes: int = 512,
        cls_prototypes: int = 4096,
        cotap_weight: float = 1.0,
        patch_cluster_weight: float = 1.0,
        cross_crop_cls_weight: float = 1.0,
        cross_image_cls_weight: float = 1.0,
        pool_sizes: Sequence[int] = (7, 14),
        top_k: int = 5,
        num_negatives: int = 5,
        negative_weight: float = 0.1,
        tau: float = 0.5,
        kappa: float = 1.0,
        weight_offset: float = -0.2,
        random_tie_break: bool = True,
        criterion: nn.Module | None = None,
        patch_temperature: float = 0.1,
        roi_output_size: int = 6,
        fg_threshold: float = 1.0,
        cls_temperature: float = 0.1,
        cross_image_temperature: float = 0.2,
        patch_sinkhorn_epsilon: float = 0.05,
        cls_sinkhorn_epsilon: float = 0.07,
        sinkhorn_iterations: int = 3,
        patch_queue_size: int = 65536,
        patch_queue_update_size: int = 2048,
        cls_queue_size: int = 8192,
        cls_queue_update_size: int = 100,
        gather_distributed: bool = False,
    ) -> None:
        """Initializes the CoTAPObjective with the specified parameters.

        Args:
            patch_prototypes: Number of patch-head prototypes (K_patch).
            cls_prototypes: Number of CLS-head prototypes (K_cls).
            cotap_weight: Weight of the CoTAP ranking term, >= 0.
            patch_cluster_weight: Weight of the patch cluster term, >= 0.
            cross_crop_cls_weight: Weight of the cross-crop CLS term, >= 0.
            cross_image_cls_weight: Weight of the cross-image CLS term, >= 0.
            pool_sizes: CoTAPLoss pooling sizes.
            top_k: CoTAPLoss foreground cells per image.
            num_negatives: CoTAPLoss other images per anchor image.
            negative_weight: CoTAPLoss weight factor of other-image pairs.
            tau: ContinuousAPLoss margin.
            kappa: ContinuousAPLoss multiplier.
            weight_offset: ContinuousAPLoss weight offset.
            random_tie_break: CoTAPLoss random tie break of foreground scores.
            criterion: CoTAPLoss ranking criterion (None: ``ContinuousAPLoss`` with
                ``tau`` / ``kappa``; see :class:`~lightly_cotap.loss.CoTAPLoss`).
            patch_temperature: PatchClusterLoss student temperature.
            roi_output_size: PatchClusterLoss RoI grid side.
            fg_threshold: PatchClusterLoss aligned-foreground threshold.
            cls_temperature: CrossCropClsLoss student temperature.
            cross_image_temperature: CrossImageClsLoss student temperature.
            patch_sinkhorn_epsilon: Sinkhorn temperature of the patch codes.
            cls_sinkhorn_epsilon: Sinkhorn temperature of the CLS codes.
            sinkhorn_iterations: Sinkhorn iterations.
            patch_queue_size: Patch-score queue length per process.
            patch_queue_update_size: Foreground patch scores queued per step.
            cls_queue_size: CLS-score queue length per process.
            cls_queue_update_size: CLS scores queued per step.
            gather_distributed: Make the terms that use other images distributed.

        Raises:
            ValueError: If an argument is out of range.
        """
        super().__init__()
        weights = {
            "cotap": cotap_weight,
            "patch_cluster": patch_cluster_weight,
            "cross_crop_cls": cross_crop_cls_weight,
            "cross_image_cls": cross_image_cls_weight,
        }
        for name, weight in weights.items():
            if not weight >= 0:
                raise ValueError(f"{name}_weight must be >= 0, got {weight}.")
        self.weights = {name: float(w) for name, w in weights.items()}
        self.cotap_loss = CoTAPLoss(
            pool_sizes=pool_sizes,
            top_k=top_k,
            num_negatives=num_negatives,
            negative_weight=negative_weight,
            tau=tau,
            kappa=kappa,
            weight_offset=weight_offset,
            random_tie_break=random_tie_break,
            criterion=criterion,
            gather_distributed=gather_distributed,
        )
        self.patch_cluster_loss = PatchClusterLoss(
            temperature=patch_temperature,
            output_size=roi_output_size,
            fg_threshold=fg_threshold,
            gather_distributed=gather_distributed,
        )
        self.cross_crop_cls_loss = CrossCropClsLoss(temperature=cls_temperature)
        self.cross_image_cls_loss = CrossImageClsLoss(
            temperature=cross_image_temperature
        )
        self.patch_codes = SinkhornCodes(
            num_prototypes=patch_prototypes,
            queue_size=patch_queue_size,
            queue_update_size=patch_queue_update_size,
            epsilon=patch_sinkhorn_epsilon,
            iterations=sinkhorn_iterations,
            gather_distributed=gather_distributed,
        )
        self.cls_codes = SinkhornCodes(
            num_prototypes=cls_prototypes,
            queue_size=cls_queue_size,
            queue_update_size=cls_queue_update_size,
            epsilon=cls_sinkhorn_epsilon,
            iterations=sinkhorn_iterations,
            gather_distributed=gather_distributed,
        )
        self.gather_distributed = gather_distributed

    def forward(
        self, *, x: CoTAPViewOutputs, pos: CoTAPViewOutputs, update_queues: bool = True
    ) -> Tensor:
        """Computes the weighted sum of the terms.

        Args:
            x: Outputs for the crops of the images ``x``.
            pos: Outputs for the crops of their neighbours ``x+`` (same shapes).
            update_queues: Push the teacher scores of this batch into the Sinkhorn
                queues (set False for evaluation).

        Returns:
            The weighted sum of the computed terms (scalar).

        Raises:
            ValueError: If the shapes of ``x`` and ``pos`` do not match or are
                invalid.
        """
        return self.forward_components(x=x, pos=pos, update_queues=update_queues).total

    def forward_components(
        self, *, x: CoTAPViewOutputs, pos: CoTAPViewOutputs, update_queues: bool = True
    ) -> CoTAPObjectiveComponents:
        """Computes the weighted total and the individual terms.

        Args:
            x: See :meth:`forward`.
            pos: See :meth:`forward`.
            update_queues: See :meth:`forward`.

        Returns:
            The weighted sum and the unweighted value of every computed term (None
            for terms with weight 0).

        Raises:
            ValueError: See :meth:`forward`.
        """
        _check_sides(x, pos)
        terms: dict[str, Tensor] = {}
        both = _concat_sides(x, pos)
        b2, g = both.teacher_patch.shape[:2]
        if self.weights["cotap"] > 0:
            terms["cotap"] = self.cotap_loss(
                student_x=x.student_patch_global,
                student_pos=pos.student_patch_global,
                teacher_x=x.teacher_patch,
                teacher_pos=pos.teacher_patch,
                fg_mask_x=x.fg_mask,
                fg_mask_pos=pos.fg_mask,
            )
        if self.weights["patch_cluster"] > 0:
            teacher = both.teacher_patch  # (2B, G, h, w, K)
            h, w, k = teacher.shape[2:]
            scores = teacher.reshape(-1, k)
            fg = both.fg_mask.float() > 0.5
            codes = self.patch_codes(
                scores, enqueue_mask=fg.reshape(-1), update=update_queues
            )
            codes = codes.reshape(b2, g, h, w, k)
            terms["patch_cluster"] = self.patch_cluster_loss(
                teacher_codes=codes,
                student_global=both.student_patch_global,
                student_local=both.student_patch_local,
                crop_boxes=both.crop_boxes,
                fg_mask=both.fg_mask,
                flipped=both.flipped,
            )
        if self.weights["cross_crop_cls"] > 0 or self.weights["cross_image_cls"] > 0:
            kc = both.teacher_cls.shape[-1]
            cls_codes = self.cls_codes(
                both.teacher_cls.reshape(-1, kc), update=update_queues
            ).reshape(b2, g, kc)
            if self.weights["cross_crop_cls"] > 0:
                terms["cross_crop_cls"] = self.cross_crop_cls_loss(
                    teacher_codes=cls_codes, student=both.student_cls
                )
            if self.weights["cross_image_cls"] > 0:
                codes_x, codes_pos = cls_codes.chunk(2)
                terms["cross_image_cls"] = self.cross_image_cls_loss(
                    teacher_codes_x=codes_x,
                    teacher_codes_pos=codes_pos,
                    student_x=x.student_cls[:, :g],
                    student_pos=pos.student_cls[:, :g],
                )
        total = sum(
            (self.weights[name] * value for name, value in terms.items()),
            start=x.student_cls.new_zeros((), dtype=torch.float32),
        )
        return CoTAPObjectiveComponents(total=total, **terms)


def _check_sides(x: CoTAPViewOutputs, pos: CoTAPViewOutputs) -> None:
    """Raises ValueError if the two sides do not have matching shapes."""
    for name in (
        "student_patch_global",
        "student_cls",
        "teacher_patch",
        "teacher_cls",
        "fg_mask",
        "crop_boxes",
        "student_patch_local",
        "flipped",
    ):
        a, b = getattr(x, name), getattr(pos, name)
        if (a is None) != (b is None) or (
            a is not None and b is not None and a.shape != b.shape
        ):
            shape_a = None if a is None else tuple(a.shape)
            shape_b = None if b is None else tuple(b.shape)
            raise ValueError(
                f"x.{name} and pos.{name} must have the same shape, got {shape_a} "
                f"and {shape_b}."
            )
    if x.teacher_patch.dim() != 5:
        raise ValueError(
            "teacher_patch must have shape (B, G, h, w, K), got "
            f"{tuple(x.teacher_patch.shape)}."
        )
    g = x.teacher_patch.shape[1]
    if x.teacher_cls.dim() != 3 or x.teacher_cls.shape[1] != g:
        raise ValueError(
            f"teacher_cls must have shape (B, G={g}, K), got "
            f"{tuple(x.teacher_cls.shape)}."
        )


def _concat_sides(x: CoTAPViewOutputs, pos: CoTAPViewOutputs) -> CoTAPViewOutputs:
    """Stacks ``x`` and ``x+`` along the batch axis (x first)."""

    def cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
        return None if a is None or b is None else torch.cat([a, b], dim=0)

    return CoTAPViewOutputs(
        student_patch_global=torch.cat(
            [x.student_patch_global, pos.student_patch_global]
        ),
        student_cls=torch.cat([x.student_cls, pos.student_cls]),
        teacher_patch=torch.cat([x.teacher_patch, pos.teacher_patch]),
        teacher_cls=torch.cat([x.teacher_cls, pos.teacher_cls]),
        fg_mask=torch.cat([x.fg_mask, pos.fg_mask]),
        crop_boxes=torch.cat([x.crop_boxes, pos.crop_boxes]),
        student_patch_local=cat(x.student_patch_local, pos.student_patch_local),
        flipped=cat(x.flipped, pos.flipped),
    )
