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

import torch
from lightly.models import utils
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn
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


class CoTAP(nn.Module):
    def __init__(self, backbone: CoTAPVisionTransformer) -> None:
        super().__init__()
        self.student_backbone = backbone
        self.student_patch_head = CoTAPPatchProjectionHead(
            input_dim=backbone.out_dim,
            hidden_dim=512,
            bottleneck_dim=128,
            output_dim=512,
        )
        self.student_cls_head = CoTAPClsProjectionHead(
            input_dim=backbone.out_dim,
            hidden_dim=512,
            bottleneck_dim=128,
            output_dim=1024,
        )
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        self.teacher_patch_head = copy.deepcopy(self.student_patch_head)
        self.teacher_cls_head = copy.deepcopy(self.student_cls_head)
        utils.deactivate_requires_grad(self.teacher_backbone)
        utils.deactivate_requires_grad(self.teacher_patch_head)
        utils.deactivate_requires_grad(self.teacher_cls_head)

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

    def update_teacher(self, momentum: float) -> None:
        utils.update_momentum(self.student_backbone, self.teacher_backbone, momentum)
        utils.update_momentum(
            self.student_patch_head, self.teacher_patch_head, momentum
        )
        utils.update_momentum(self.student_cls_head, self.teacher_cls_head, momentum)


# A timm ViT-Ti/16 with the object-aware filter (randomly initialised here) and
# 16 object prototypes (paper: 64 prototypes, k-means on a bank of 1024 samples).
backbone = CoTAPVisionTransformer(
    "vit_tiny_patch16_224", img_size=96, num_prototypes=16
)
# CoTAP continues an image-level SSL checkpoint, e.g.:
# backbone.load_pretrained("dino_deitsmall16_pretrain.pth", strict=False)
model = CoTAP(backbone)

device = "cuda" if torch.cuda.is_available() else "cpu"
model.to(device)

# Global crops of 96 px (6 x 6 patches) and local crops of 48 px.
transform = CoTAPTransform(global_crop_size=96, local_crop_size=48, n_local_views=2)

# The 8 embedded sample photos. For your own images use for example:
# from lightly.data import LightlyDataset
# dataset = LightlyDataset("path/to/folder")
dataset = SampleImageDataset()

# Nearest neighbours of every image (CoTAP uses 7 from an SSL backbone); the
# positive image x+ of x is drawn from them. Save / reuse with index.save(...).
model.eval()
neighbors = NeighborIndex.build(
    dataset,
    model.student_backbone,
    k=3,
    transform=default_embedding_transform(96),
    batch_size=8,
    device=device,
)
model.train()
pair_dataset = SemanticPairDataset(dataset, neighbors=neighbors, transform=transform)

dataloader = DataLoader(
    pair_dataset,
    batch_size=4,
    shuffle=True,
    drop_last=True,
    num_workers=0,
)

# CoTAP ranking + patch clustering + cross-crop CLS + cross-image CLS terms.
criterion = CoTAPObjective(
    patch_prototypes=512,
    cls_prototypes=1024,
    pool_sizes=(3, 6),  # paper: (7, 14) on the 14 x 14 grid of 224 px crops
    roi_output_size=3,
    patch_queue_size=4096,
    patch_queue_update_size=512,
    cls_queue_size=256,
    cls_queue_update_size=16,
).to(device)
# The object prototypes: k-means on a bank of block features, then entropy loss.
prototype_bank = PrototypeBank(
    num_samples=64, dim=backbone.bank_dim, num_update_when_full=8
).to(device)
prototype_criterion = PrototypeEntropyLoss()

backbone_params, backbone_params_no_wd = utils.get_weight_decay_parameters(
    [model.student_backbone]
)
head_params, head_params_no_wd = utils.get_weight_decay_parameters(
    [model.student_patch_head, model.student_cls_head]
)
optimizer = torch.optim.AdamW(
    [
        {"params": [p for p in backbone_params if p.requires_grad], "lr": 3e-5},
        {"params": backbone_params_no_wd, "lr": 3e-5, "weight_decay": 0.0},
        {"params": [p for p in head_params if p.requires_grad], "lr": 3e-4},
        {"params": head_params_no_wd, "lr": 3e-4, "weight_decay": 0.0},
    ]
)


def outputs(
    views: dict, teacher_outputs: tuple[Tensor, ...]
) -> tuple[CoTAPViewOutputs, Tensor]:
    """Student outputs of all crops of one side (x or x+) and its bank features."""
    student = [model(view.to(device)) for view in views["student"]]
    t_patch, t_cls, t_fg = teacher_outputs
    return CoTAPViewOutputs(
        student_patch_global=torch.stack([s[0] for s in student[:2]], dim=1),
        student_cls=torch.stack([s[1] for s in student], dim=1),
        teacher_patch=t_patch,
        teacher_cls=t_cls,
        fg_mask=t_fg,
        crop_boxes=views["boxes"].to(device),
        student_patch_local=torch.stack([s[0] for s in student[2:]], dim=1),
        flipped=views["flipped"].to(device),
    ), torch.cat([s[2] for s in student[:2]])


def teacher(views: dict) -> tuple[Tensor, ...]:
    """Teacher outputs of the two colour-free global crops, stacked on dim 1."""
    out = [model.forward_teacher(view.to(device)) for view in views["teacher"]]
    return tuple(torch.stack([o[i] for o in out], dim=1) for i in range(3))


epochs = int(os.environ.get("LIGHTLY_COTAP_EXAMPLE_EPOCHS", 10))
num_steps = epochs * len(dataloader)

print("Starting Training")
for epoch in range(epochs):
    total_loss = 0.0
    for step_in_epoch, (views, views_pos, _, _) in enumerate(dataloader):
        step = epoch * len(dataloader) + step_in_epoch
        model.update_teacher(cosine_schedule(step, num_steps, 0.9997, 0.9999))
        weight_decay = cosine_schedule(step, num_steps, 0.024, 0.24)
        for group in optimizer.param_groups:
            if group["weight_decay"] != 0.0:
                group["weight_decay"] = weight_decay

        # Initialise the prototypes by k-means once the bank is full.
        if prototype_bank.is_full and not backbone.prototypes_initialized:
            backbone.init_prototypes_from_bank(prototype_bank.samples, num_iters=50)
            teacher_filter = model.teacher_backbone.filter
            assert teacher_filter is not None
            teacher_filter.set_prototypes(backbone.prototypes.data)

        x, bank_x = outputs(views, teacher(views))
        pos, bank_pos = outputs(views_pos, teacher(views_pos))
        loss = criterion(x=x, pos=pos)
        prototype_bank.update(torch.cat([bank_x, bank_pos]))
        if backbone.prototypes_initialized:
            loss = loss + prototype_criterion(
                prototypes=backbone.prototypes, samples=prototype_bank.samples
            )
        total_loss += loss.detach()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    avg_loss = total_loss / len(dataloader)
    print(f"epoch: {epoch:>02}, loss: {avg_loss:.5f}")
