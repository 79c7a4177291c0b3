"""The CoTAP training recipe as a PyTorch Lightning module.

Over 400 lines because the recipe is one job whose steps (EMA teacher, forward of
both sides, objective, prototype bank, schedules, optimiser groups) share its state.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from lightly.models import utils as lightly_utils
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from lightly_cotap.loss.cotap_objective import CoTAPObjective, CoTAPViewOutputs
from lightly_cotap.loss.prototype_entropy_loss import PrototypeEntropyLoss
from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer
from lightly_cotap.models.modules.heads import (
    CoTAPClsProjectionHead,
    CoTAPPatchProjectionHead,
)
from lightly_cotap.models.modules.prototype_bank import PrototypeBank
from lightly_cotap.train.cotap_student import CoTAPStudent


class CoTAPModule(pl.LightningModule):
    """CoTAP [0] post-pretraining recipe: student / EMA teacher, full objective.

    One step on a batch of ``(views, views_pos, index, index_pos)`` from
    :class:`~lightly_cotap.data.SemanticPairDataset` with a
    :class:`~lightly_cotap.transforms.CoTAPTransform`:

    1. Teacher EMA update with :func:`lightly.models.utils.update_momentum`, momentum
       cosine from ``momentum_start`` (0.9997) to ``momentum_end`` (0.9999) over the
       run (:func:`lightly.utils.scheduler.cosine_schedule`).
    2. Teacher forward on the colour-free global crops of ``x`` and ``x+`` (patch
       and CLS scores, foreground mask); student forward on the augmented global
       crops (plus prototype-bank features) and on the local crops.
    3. :class:`~lightly_cotap.loss.CoTAPObjective` (CoTAP ranking + patch cluster +
       cross-crop CLS + cross-image CLS), plus the prototype entropy loss once the
       prototypes are initialised: the student's global-crop block features fill a
       :class:`~lightly_cotap.models.modules.PrototypeBank`; when it is full the
       prototypes are set by spherical k-means and then trained by
       :class:`~lightly_cotap.loss.PrototypeEntropyLoss`.

    Optimisation as in the official code: AdamW, learning rate ``backbone_lr``
    (3e-5, including the filter) and ``head_lr`` (3e-4), cosine decay to
    ``final_lr_ratio`` (1/10) of them without warm-up; weight decay on weights only
    (no norms, no biases), cosine ramp from ``weight_decay_start`` (0.024) to
    ``weight_decay_end`` (0.24). Mixed precision is the Trainer's ``precision``.
    Except for the one step that initialises the prototypes (k-means), a training
    step never waits for the device (no host synchronisation), so the host queues
    the next kernels while the GPU works; :meth:`compile_networks` compiles the
    networks and the objective.

    Differences from the official code (documented choices): when k-means sets the
    student's prototypes, they are copied to the teacher too (officially the
    teacher's prototypes drift from random towards them at EMA speed); one dataset
    feeds both the patch and the CLS terms; the Sinkhorn codes are computed from the
    first step on.

    - [0]: Wen et al., Semantic Concentration for Self-Supervised Dense
      Representations Learning, 2025, https://arxiv.org/abs/2509.09429

    Attributes:
        student: Student backbone and heads (trained).
        teacher: EMA copy of the student (no gradients).
        objective: The CoTAP objective.
        prototype_bank: Bank of pooled block features for the prototypes, or None
            without the object-aware filter.
        prototype_entropy: The prototype entropy loss.

    Examples:
        >>> module = CoTAPModule("vit_small_patch16_224")
        >>> module.load_backbone_weights("dino_deitsmall16_pretrain.pth")
        >>> trainer = pl.Trainer(max_steps=240_000, precision="16-mixed")
        >>> trainer.fit(module, dataloader)
    """

    def __init__(
        self,
        backbone: str = "vit_small_patch16_224",
        *,
        backbone_kwargs: Mapping[str, Any] | None = None,
        use_filter: bool = True,
        num_prototypes: int = 64,
        prototype_size: int = 3,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        patch_prototypes: int = 512,
        cls_prototypes: int = 4096,
        objective_kwargs: Mapping[str, Any] | None = None,
        prototype_entropy_weight: float = 1.0,
        prototype_entropy_temperature: float = 0.1,
        prototype_bank_size: int = 1024,
        prototype_bank_update: int = 32,
        kmeans_iters: int = 300,
        backbone_lr: float = 3e-5,
        head_lr: float = 3e-4,
        final_lr_ratio: float = 0.1,
        weight_decay_start: float = 0.024,
        weight_decay_end: float = 0.24,
        momentum_start: float = 0.9997,
        momentum_end: float = 0.9999,
        max_steps: int | None = None,
        gather_distributed: bool = False,
    ) -> None:
        """Initializes the CoTAPModule.

        Args:
            backbone: timm ViT name for :class:`CoTAPVisionTransformer`.
            backbone_kwargs: Extra arguments for it (``img_size``, timm kwargs such
                as ``depth`` or ``patch_size``).
            use_filter: Use the object-aware filter.
            num_prototypes: Number of filter prototypes (64).
            prototype_size: Spatial size of the prototypes (3).
            head_hidden_dim: Hidden width of both projection heads (2048).
            head_bottleneck_dim: Bottleneck width of both heads (256).
            patch_prototypes: Patch-head prototypes K_patch (512).
            cls_prototypes: CLS-head prototypes K_cls (4096).
            objective_kwargs: Extra arguments for :class:`CoTAPObjective`.
            prototype_entropy_weight: Weight of the prototype entropy loss (1).
            prototype_entropy_temperature: Its temperature (0.1).
            prototype_bank_size: Samples in the prototype bank (1024).
            prototype_bank_update: Samples replaced per step once full (32).
            kmeans_iters: k-means iterations of the prototype initialisation.
            backbone_lr: Backbone learning rate (3e-5).
            head_lr: Projection-head learning rate (3e-4).
            final_lr_ratio: Final / initial learning rate of the cosine decay (0.1).
            weight_decay_start: Initial weight decay (0.024).
            weight_decay_end: Final weight decay (0.24).
            momentum_start: Initial EMA momentum of the teacher (0.9997).
            momentum_end: Final EMA momentum (0.9999).
            max_steps: Length of the schedules; defaults to the Trainer's
                estimated number of steps.
            gather_distributed: Distributed terms of the objective (see
                :class:`CoTAPObjective`) and a gathered prototype bank.

        Raises:
            ValueError: If an argument is out of range.
        """
        super().__init__()
        self.save_hyperparameters()
        for name, value in (
            ("backbone_lr", backbone_lr),
            ("head_lr", head_lr),
            ("final_lr_ratio", final_lr_ratio),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}.")
        for name, value in (
            ("momentum_start", momentum_start),
            ("momentum_end", momentum_end),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}.")
        vit = CoTAPVisionTransformer(
            backbone,
            use_filter=use_filter,
            num_prototypes=num_prototypes,
            prototype_size=prototype_size,
            **dict(backbone_kwargs or {}),
        )
        self.student = CoTAPStudent(
            vit,
            CoTAPPatchProjectionHead(
                input_dim=vit.out_dim,
                hidden_dim=head_hidden_dim,
                bottleneck_dim=head_bottleneck_dim,
                output_dim=patch_prototypes,
            ),
            CoTAPClsProjectionHead(
                input_dim=vit.out_dim,
                hidden_dim=head_hidden_dim,
                bottleneck_dim=head_bottleneck_dim,
                output_dim=cls_prototypes,
            ),
        )
        self.teacher = copy.deepcopy(self.student)
        lightly_utils.deactivate_requires_grad(self.teacher)
        objective_args: dict[str, Any] = dict(
            patch_prototypes=patch_prototypes,
            cls_prototypes=cls_prototypes,
            gather_distributed=gather_distributed,
        )
        objective_args.update(objective_kwargs or {})
        self.objective = CoTAPObjective(**objective_args)
        self.prototype_bank: PrototypeBank | None = (
            PrototypeBank(
                num_samples=prototype_bank_size,
                dim=vit.bank_dim,
                num_update_when_full=prototype_bank_update,
                gather_distributed=gather_distributed,
            )
            if use_filter
            else None
        )
        self.prototype_entropy = PrototypeEntropyLoss(
            temperature=prototype_entropy_temperature
        )

    # -- public helpers --------------------------------------------------------------

    @property
    def backbone(self) -> CoTAPVisionTransformer:
        """The student backbone (what is exported after training)."""
        return self.student.backbone

    def load_backbone_weights(
        self,
        checkpoint: str | os.PathLike[str] | Mapping[str, Any],
        strict: bool = False,
    ) -> str:
        """Loads pretrained backbone weights into the student and the teacher.

        Args:
            checkpoint: A checkpoint accepted by
                :meth:`CoTAPVisionTransformer.load_pretrained` (DINO, iBOT, timm,
                official CoTAP, lightly-cotap export, ...).
            strict: Raise on missing / unexpected keys (default False: an image-level
                SSL checkpoint has no filter weights).

        Returns:
            The load report as text.
        """
        report = self.student.backbone.load_pretrained(checkpoint, strict=strict)
        self.teacher.backbone.load_state_dict(self.student.backbone.state_dict())
        return report.summary()

    def compile_networks(
        self, *, objective: bool = True, **compile_kwargs: Any
    ) -> None:
        """Compiles the student, the teacher and the objective with ``torch.compile``.

        Each is compiled in place (``nn.Module.compile``): state-dict keys,
        checkpoints and the exported backbone stay as without compilation. The
        objective captures as one graph without breaks on the dense ranking path
        (lists up to the device's bound), where the compiler fuses the ``(n, n)``
        element-wise work; the sort-based path of longer lists runs eagerly inside
        it.

        Args:
            objective: Also compile the objective.
            **compile_kwargs: Arguments of ``torch.compile`` (e.g. ``mode``,
                ``backend``).
        """
        for module in (self.student, self.teacher):
            module.compile(**compile_kwargs)
        if objective:
            # A step calls forward_components (the terms are logged), not forward.
            self.objective.forward_components = torch.compile(  # type: ignore[method-assign]
                self.objective.forward_components, **compile_kwargs
            )

    def schedule_steps(self) -> int:
        """Number of steps of the schedules (momentum, learning rate, weight decay)."""
        if self.hparams["max_steps"] is not None:
            return int(self.hparams["max_steps"])
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            steps = trainer.estimated_stepping_batches
            if isinstance(steps, (int, float)) and steps != float("inf"):
                return max(int(steps), 1)
        raise ValueError(
            "CoTAPModule needs max_steps, either as an argument or from a Trainer "
            "with max_steps / max_epochs."
        )

    # -- training --------------------------------------------------------------------

    def forward_pair(
        self, views: Mapping[str, Any], views_pos: Mapping[str, Any]
    ) -> tuple[CoTAPViewOutputs, CoTAPViewOutputs, Tensor | None]:
        """Student and teacher forward passes on the crops of ``x`` and ``x+``.

        Args:
            views: Collated :class:`~lightly_cotap.transforms.CoTAPViews` of ``x``:
                ``student`` (V tensors (B, 3, S, S), globals first), ``teacher`` (G
                tensors), ``boxes`` (B, V, 4), optional ``flipped`` (B, V).
            views_pos: The same for ``x+``.

        Returns:
            ``(x, pos, bank_features)``: the objective inputs of both sides and the
            student's prototype-bank features of all global crops (or None).
        """
        teacher_views = list(views["teacher"]) + list(views_pos["teacher"])
        g = len(views["teacher"])
        num_crops = len(views["student"])
        batch = views["teacher"][0].shape[0]
        student_globals = list(views["student"][:g]) + list(views_pos["student"][:g])
        student_locals = list(views["student"][g:]) + list(views_pos["student"][g:])
        with torch.no_grad():
            t_patch, t_cls, t_fg, _ = self.teacher(
                torch.cat(teacher_views), return_fg_mask=True
            )
        use_bank = self.prototype_bank is not None and self.training
        s_patch, s_cls, _, bank_features = self.student(
            torch.cat(student_globals), return_bank_features=use_bank
        )
        s_local_patch = s_local_cls = None
        if student_locals:
            s_local_patch, s_local_cls, _, _ = self.student(torch.cat(student_locals))

        def split(t: Tensor, crops: int) -> tuple[Tensor, Tensor]:
            """(2 * crops * B, ...) in [side, crop, b] order -> 2 x (B, crops, ...)."""
            t = t.reshape(2, crops, batch, *t.shape[1:]).transpose(1, 2)
            return t[0], t[1]

        assert t_fg is not None
        outputs = []
        for side in range(2):
            source = views if side == 0 else views_pos
            cls_parts = [split(s_cls, g)[side]]
            local_patch = None
            if s_local_patch is not None and s_local_cls is not None:
                local_patch = split(s_local_patch, num_crops - g)[side]
                cls_parts.append(split(s_local_cls, num_crops - g)[side])
            flipped = source.get("flipped")
            outputs.append(
                CoTAPViewOutputs(
                    student_patch_global=split(s_patch, g)[side],
                    student_cls=torch.cat(cls_parts, dim=1),
                    teacher_patch=split(t_patch, g)[side],
                    teacher_cls=split(t_cls, g)[side],
                    fg_mask=split(t_fg, g)[side],
                    crop_boxes=source["boxes"],
                    student_patch_local=local_patch,
                    flipped=flipped,
                )
            )
        return outputs[0], outputs[1], bank_features

    def compute_losses(
        self, batch: Sequence[Any], update_state: bool = True
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and its terms for a batch (no EMA update, no logging).

        Args:
            batch: ``(views, views_pos, ...)`` from a SemanticPairDataset loader.
            update_state: Update the Sinkhorn queues and the prototype bank (and
                initialise the prototypes when the bank is full).

        Returns:
            ``(total, terms)``; ``terms`` holds the objective's terms and, once the
            prototypes are initialised, ``"prototype_entropy"``.
        """
        views, views_pos = batch[0], batch[1]
        bank = self.prototype_bank
        # Initialise before the forward: the prototypes are changed in place.
        if (
            bank is not None
            and update_state
            and bank.is_full
            and not self.student.backbone.prototypes_initialized
        ):
            self.initialize_prototypes()
        x, pos, bank_features = self.forward_pair(views, views_pos)
        components = self.objective.forward_components(
            x=x, pos=pos, update_queues=update_state
        )
        total, terms = components.total, components.terms()
        if bank is not None and bank_features is not None and update_state:
            bank.update(bank_features)
        weight = float(self.hparams["prototype_entropy_weight"])
        if (
            bank is not None
            and weight > 0
            and self.student.backbone.prototypes_initialized
            and bank.samples.shape[0] > 0
        ):
            entropy = self.prototype_entropy(
                prototypes=self.student.backbone.prototypes, samples=bank.samples
            )
            terms["prototype_entropy"] = entropy
            total = total + weight * entropy
        return total, terms

    @torch.no_grad()
    def initialize_prototypes(self) -> None:
        """Sets the prototypes by spherical k-means on the bank (student and teacher)."""
        assert self.prototype_bank is not None
        self.student.backbone.init_prototypes_from_bank(
            self.prototype_bank.samples, num_iters=int(self.hparams["kmeans_iters"])
        )
        student_filter = self.student.backbone.filter
        teacher_filter = self.teacher.backbone.filter
        assert student_filter is not None and teacher_filter is not None
        teacher_filter.set_prototypes(student_filter.prototypes.data)

    def training_step(self, batch: Sequence[Any], batch_idx: int) -> Tensor:
        """Runs one CoTAP step (EMA update, forward, objective, logging).

        Args:
            batch: ``(views, views_pos, index, index_pos)`` of a
                :class:`~lightly_cotap.data.SemanticPairDataset`.
            batch_idx: Index of the batch (unused).

        Returns:
            The total loss.
        """
        steps = self.schedule_steps()
        step = min(self.global_step, steps)
        momentum = cosine_schedule(
            step,
            steps,
            float(self.hparams["momentum_start"]),
            float(self.hparams["momentum_end"]),
        )
        lightly_utils.update_momentum(self.student, self.teacher, m=momentum)
        self.teacher.eval()
        total, terms = self.compute_losses(batch)
        batch_size = int(batch[0]["teacher"][0].shape[0])
        self.log(
            "train/loss", total, prog_bar=True, on_step=True, batch_size=batch_size
        )
        self.log_dict(
            {f"train/loss_{name}": value.detach() for name, value in terms.items()},
            on_step=True,
            batch_size=batch_size,
        )
        self.log("train/momentum", momentum, on_step=True, batch_size=batch_size)
        return total

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Applies the weight-decay ramp to the decayed parameter groups.

        Args:
            batch: The batch (unused).
            batch_idx: Index of the batch (unused).
        """
        steps = self.schedule_steps()
        weight_decay = cosine_schedule(
            min(self.global_step, steps),
            steps,
            float(self.hparams["weight_decay_start"]),
            float(self.hparams["weight_decay_end"]),
        )
        optimizers = self.optimizers(use_pl_optimizer=False)
        optimizer = optimizers[0] if isinstance(optimizers, list) else optimizers
        for group in optimizer.param_groups:
            if group.get("apply_weight_decay", False):
                group["weight_decay"] = weight_decay

    def configure_optimizers(self) -> Any:
        """AdamW with backbone / head groups and a cosine learning-rate decay."""
        groups = []
        for module, lr, name in (
            (self.student.backbone, float(self.hparams["backbone_lr"]), "backbone"),
            (
                nn.ModuleList([self.student.patch_head, self.student.cls_head]),
                float(self.hparams["head_lr"]),
                "heads",
            ),
        ):
            decay, no_decay = lightly_utils.get_weight_decay_parameters([module])
            groups.append(
                {
                    "name": name,
                    "params": [p for p in decay if p.requires_grad],
                    "lr": lr,
                    "weight_decay": float(self.hparams["weight_decay_start"]),
                    "apply_weight_decay": True,
                }
            )
            groups.append(
                {
                    "name": f"{name}_no_weight_decay",
                    "params": [p for p in no_decay if p.requires_grad],
                    "lr": lr,
                    "weight_decay": 0.0,
                    "apply_weight_decay": False,
                }
            )
        optimizer = torch.optim.AdamW(groups)
        steps = self.schedule_steps()
        final = float(self.hparams["final_lr_ratio"])
        scheduler = LambdaLR(
            optimizer,
            lambda step: cosine_schedule(min(step, steps), steps, 1.0, final),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
