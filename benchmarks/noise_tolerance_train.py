"""Student, criteria and training loop of the noise-tolerance benchmark."""

from __future__ import annotations

import torch
from lr_schedule import set_lr
from noise_tolerance_data import Batches, SeedData, TeacherStats
from noise_tolerance_settings import (
    CRITERIA,
    NUM_NEGATIVES,
    TEACHER_DIM,
    TEMPERATURE,
    Config,
)
from torch import Tensor, nn

from lightly_cotap.loss import (
    BinaryAPLoss,
    ContinuousAPLoss,
    CoTAPLoss,
    HingeContinuousAPLoss,
    SimilarityKLLoss,
    SimilarityMSELoss,
    STEGOCorrelationLoss,
    TopKInfoNCELoss,
)


class Student(nn.Module):
    """Small conv net: (B, 3, 96, 96) pixels -> (B, 12, 12, 16) patch features."""

    def __init__(self, dim: int = TEACHER_DIM) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 32, 2, stride=2),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, dim, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out.permute(0, 2, 3, 1)  # channel-last (B, h, w, D)


def make_criterion(name: str, stats: TeacherStats, list_size: int) -> nn.Module:
    """The criterion ``name`` with its decision for the setting of ``stats``."""
    if name == "continuous_ap":
        return ContinuousAPLoss()
    if name == "hinge_ap":
        return HingeContinuousAPLoss()
    if name == "mse":
        return SimilarityMSELoss()
    if name == "kl":
        return SimilarityKLLoss(temperature=TEMPERATURE)
    calibrated = not name.endswith("_fixed")
    if name.startswith("binary_ap"):
        return BinaryAPLoss(threshold=stats.midpoint if calibrated else 0.5)
    if name.startswith("stego"):
        return STEGOCorrelationLoss(shift=stats.midpoint if calibrated else 0.5)
    if name.startswith("infonce"):
        k = stats.positives_per_list if calibrated else list_size // 2
        return TopKInfoNCELoss(top_k=k, temperature=TEMPERATURE)
    raise ValueError(f"unknown criterion {name!r}; choose from {CRITERIA}.")


def train_student(
    student: Student,
    data: SeedData,
    teacher: Tensor,
    batches: Batches,
    criterion: nn.Module,
    cfg: Config,
    lr: float,
    weight_offset: float = -0.2,
) -> list[float]:
    """Trains ``student`` through CoTAPLoss; returns the loss of every step."""
    loss_fn = CoTAPLoss(
        pool_sizes=(cfg.scene_size // cfg.patch_size,),
        top_k=cfg.top_k,
        num_negatives=NUM_NEGATIVES,
        weight_offset=weight_offset,
        criterion=criterion,
    )
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    losses = []
    student.train()
    for step in range(cfg.steps):
        set_lr(opt, step, cfg.steps, lr)
        x, pos, fg_x, fg_pos = batches.step(step)
        s_x, s_pos = student(torch.cat([data.train_images[x], data.train_images[pos]]))[
            :, None
        ].split(len(x))
        loss = loss_fn(
            student_x=s_x,
            student_pos=s_pos,
            teacher_x=teacher[x][:, None],
            teacher_pos=teacher[pos][:, None],
            fg_mask_x=fg_x,
            fg_mask_pos=fg_pos,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def student_features(student: Student, images: Tensor) -> Tensor:
    return torch.cat([student.eval()(b) for b in images.split(64)])
