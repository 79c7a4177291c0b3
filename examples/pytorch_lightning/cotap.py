# This example requires the following dependencies to be installed:
# pip install lightly-cotap

# Note: The model and training settings do not follow the reference settings
# from the paper. The settings are chosen such that the example can easily be
# run on a small dataset with a single GPU (here: the 8 embedded sample images,
# even on a CPU). The paper continues an image-level SSL checkpoint (e.g. DINO
# ViT-S/16) with 224 px global and 96 px local crops, 7 neighbours per image,
# 4 GPUs x 28 pairs and 240k steps; `lightly-cotap train --data DIR --init CKPT`
# runs that recipe.
#
# CoTAP (https://arxiv.org/abs/2509.09429) distils the teacher's patch
# correspondences between an image x and a nearest-neighbour image x+ with a
# continuous-target AP ranking loss, next to Leopart-style patch clustering and
# CLS distillation, and adds an object-aware filter (learned object prototypes)
# to the last ViT block.

import copy
import os
from typing import Any

import pytorch_lightning as pl
import torch
from lightly.models import utils
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor
from torch.utils.data import DataLoader

from lightly_cotap.data import NeighborIndex, SampleImageDataset, SemanticPairDataset
from lightly_cotap.data.embedding import default_embedding_transform
from lightly_cotap.loss import CoTAPObjective, CoTAPViewOutputs, PrototypeEntropyLoss
from lightly_cotap.models import CoTAPVisionTransformer
from lightly_cotap.models.modules.heads import (
    CoTAPClsProjectionHead,
    CoTAPPatchProjectionHead,
)
from lightly_cotap.models.modules.prototype_bank import PrototypeBank
from lightly_cotap.transforms import CoTAPTransform


class CoTAP(pl.LightningModule):
    def __init__(self, max_steps: int) -> None:
        super().__init__()
        self.max_steps = max_steps
        # A timm ViT-Ti/16 with the object-aware filter and 16 object prototypes
        # (paper: ViT-S/16 from an SSL checkpoint, 64 prototypes), e.g.
        # self.student_backbone.load_pretrained("dino_deitsmall16_pretrain.pth", strict=False)
        self.student_backbone = CoTAPVisionTransformer(
            "vit_tiny_patch16_224", img_size=96, num_prototypes=16
        )
        out_dim = self.student_backbone.out_dim
        self.student_patch_head = CoTAPPatchProjectionHead(
            input_dim=out_dim, hidden_dim=512, bottleneck_dim=128, output_dim=512
        )
        self.student_cls_head = CoTAPClsProjectionHead(
            input_dim=out_dim, hidden_dim=512, bottleneck_dim=128, output_dim=1024
        )
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        self.teacher_patch_head = copy.deepcopy(self.student_patch_head)
        self.teacher_cls_head = copy.deepcopy(self.student_cls_head)
        utils.deactivate_requires_grad(self.teacher_backbone)
        utils.deactivate_requires_grad(self.teacher_patch_head)
        utils.deactivate_requires_grad(self.teacher_cls_head)

        self.criterion = CoTAPObjective(
            patch_prototypes=512,
            cls_prototypes=1024,
            pool_sizes=(3, 6),  # paper: (7, 14) on the 14 x 14 grid of 224 px crops
            roi_output_size=3,
            patch_queue_size=4096,
            patch_queue_update_size=512,
            cls_queue_size=256,
            cls_queue_update_size=16,
        )
        self.prototype_bank = PrototypeBank(
            num_samples=64, dim=self.student_backbone.bank_dim, num_update_when_full=8
        )
        self.prototype_criterion = PrototypeEntropyLoss()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        out = self.student_backbone(x, return_bank_features=self.training)
        patch = self.student_patch_head(out.dense)
        cls = self.student_cls_head(out.cls)
        return patch, cls, out.bank_features

    @torch.no_grad()
    def forward_teacher(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.teacher_backbone(x, return_fg_mask=True)
        patch = self.teacher_patch_head(out.dense)
        cls = self.teacher_cls_head(out.cls)
        assert out.fg_mask is not None
        return patch, cls, out.fg_mask

    def side_outputs(self, views: dict[str, Any]) -> tuple[CoTAPViewOutputs, Tensor]:
        """Objective inputs of one side (x or x+) and its prototype-bank features."""
        student = [self.forward(view) for view in views["student"]]
        teacher = [self.forward_teacher(view) for view in views["teacher"]]
        return CoTAPViewOutputs(
            student_patch_global=torch.stack([s[0] for s in student[:2]], dim=1),
            student_cls=torch.stack([s[1] for s in student], dim=1),
            teacher_patch=torch.stack([t[0] for t in teacher], dim=1),
            teacher_cls=torch.stack([t[1] for t in teacher], dim=1),
            fg_mask=torch.stack([t[2] for t in teacher], dim=1),
            crop_boxes=views["boxes"],
            student_patch_local=torch.stack([s[0] for s in student[2:]], dim=1),
            flipped=views["flipped"],
        ), torch.cat([s[2] for s in student[:2] if s[2] is not None])

    def compute_loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        views, views_pos = batch[0], batch[1]
        # Initialise the prototypes by k-means once the bank is full.
        backbone = self.student_backbone
        if self.prototype_bank.is_full and not backbone.prototypes_initialized:
            backbone.init_prototypes_from_bank(
                self.prototype_bank.samples, num_iters=50
            )
            teacher_filter = self.teacher_backbone.filter
            assert teacher_filter is not None
            teacher_filter.set_prototypes(backbone.prototypes.data)
        x, bank_x = self.side_outputs(views)
        pos, bank_pos = self.side_outputs(views_pos)
        components = self.criterion.forward_components(x=x, pos=pos)
        loss, terms = components.total, components.terms()
        self.prototype_bank.update(torch.cat([bank_x, bank_pos]))
        if backbone.prototypes_initialized:
            terms["prototype_entropy"] = self.prototype_criterion(
                prototypes=backbone.prototypes, samples=self.prototype_bank.samples
            )
            loss = loss + terms["prototype_entropy"]
        return loss, terms

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        momentum = cosine_schedule(self.global_step, self.max_steps, 0.9997, 0.9999)
        utils.update_momentum(self.student_backbone, self.teacher_backbone, momentum)
        utils.update_momentum(
            self.student_patch_head, self.teacher_patch_head, momentum
        )
        utils.update_momentum(self.student_cls_head, self.teacher_cls_head, momentum)
        weight_decay = cosine_schedule(self.global_step, self.max_steps, 0.024, 0.24)
        for group in self.optimizers().optimizer.param_groups:
            if group["weight_decay"] != 0.0:
                group["weight_decay"] = weight_decay
        loss, terms = self.compute_loss(batch)
        batch_size = len(batch[2])
        self.log("train_loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict(
            {f"train_loss_{name}": term for name, term in terms.items()},
            batch_size=batch_size,
        )
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        backbone_params, backbone_params_no_wd = utils.get_weight_decay_parameters(
            [self.student_backbone]
        )
        head_params, head_params_no_wd = utils.get_weight_decay_parameters(
            [self.student_patch_head, self.student_cls_head]
        )
        return torch.optim.AdamW(
            [
                {"params": [p for p in backbone_params if p.requires_grad], "lr": 3e-5},
                {"params": backbone_params_no_wd, "lr": 3e-5, "weight_decay": 0.0},
                {"params": [p for p in head_params if p.requires_grad], "lr": 3e-4},
                {"params": head_params_no_wd, "lr": 3e-4, "weight_decay": 0.0},
            ]
        )


if __name__ == "__main__":
    # Global crops of 96 px (6 x 6 patches) and local crops of 48 px.
    transform = CoTAPTransform(global_crop_size=96, local_crop_size=48, n_local_views=2)

    # The 8 embedded sample photos. For your own images use for example:
    # from lightly.data import LightlyDataset
    # dataset = LightlyDataset("path/to/folder")
    dataset = SampleImageDataset()

    epochs = int(os.environ.get("LIGHTLY_COTAP_EXAMPLE_EPOCHS", 10))
    batch_size = 4
    model = CoTAP(max_steps=epochs * (len(dataset) // batch_size))

    # Nearest neighbours of every image (CoTAP uses 7 from an SSL backbone).
    model.eval()
    neighbors = NeighborIndex.build(
        dataset,
        model.student_backbone,
        k=3,
        transform=default_embedding_transform(96),
        batch_size=8,
    )
    model.train()
    pair_dataset = SemanticPairDataset(
        dataset, neighbors=neighbors, transform=transform
    )

    dataloader = DataLoader(
        pair_dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=0,
    )

    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    trainer = pl.Trainer(
        max_epochs=epochs,
        devices=1,
        accelerator=accelerator,
        precision="bf16-mixed" if accelerator == "gpu" else "32-true",
    )
    trainer.fit(model=model, train_dataloaders=dataloader)
