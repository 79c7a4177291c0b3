"""Evaluation of the noise-tolerance benchmark: mIoU, misleading gradient share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from noise_tolerance_data import Batches, SeedData, pair_lists
from noise_tolerance_settings import Config
from noise_tolerance_train import Student, student_features
from torch import Tensor, nn

from lightly_cotap.eval import DenseFeatures, kmeans_segmentation, linear_probe_miou


def misleading_gradient_share(
    student: Student,
    data: SeedData,
    teacher: Tensor,
    batches: Batches,
    criterion: nn.Module,
    steps: range,
) -> float:
    """Share of the criterion's gradient mass that pushes pairs against their class.

    On the lists of ``steps`` (student cosines as leaf scores, teacher cosines as
    targets, CoTAP's anchor weights), a pair is pushed together when ``-dL/ds > 0``;
    that is misleading for a different-class pair, and pushing apart is misleading
    for a same-class pair.
    """
    feats = student_features(student, data.train_images)
    s, same, factor = pair_lists(data, feats, batches, steps)
    t, _, _ = pair_lists(data, teacher, batches, steps)
    wrong, total = 0.0, 0.0
    for row in range(s.shape[0]):
        scores = s[row].clone().requires_grad_(True)
        weights = (t[row] + 0.2).clamp_min(0.0) * factor[row]
        loss = criterion(scores=scores, targets=t[row], weights=weights)
        (grad,) = torch.autograd.grad(loss, scores)
        pull = -grad
        wrong += float(pull[~same[row]].clamp_min(0).sum())
        wrong += float((-pull[same[row]]).clamp_min(0).sum())
        total += float(grad.abs().sum())
    return wrong / total if total > 0 else 0.0


def evaluate(
    student: Student, data: SeedData, cfg: Config, seed: int
) -> dict[str, float]:
    """Linear-probe and k-means mIoU of the student's normalised patch features."""
    probe, test = (
        DenseFeatures(
            F.normalize(student_features(student, d.features), dim=-1),
            d.masks,
        )
        for d in (data.probe, data.test)
    )
    linear = linear_probe_miou(
        probe, test, data.num_classes, steps=cfg.probe_steps, seed=seed, progress=False
    )
    kmeans = kmeans_segmentation(
        test, data.num_classes, n_init=cfg.kmeans_n_init, seed=seed, progress=False
    )
    return {"linear_probe": float(linear["miou"]), "kmeans": float(kmeans["miou"])}
