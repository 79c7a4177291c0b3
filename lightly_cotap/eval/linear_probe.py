"""Frozen linear segmentation probe on cached dense features.

Protocol of CoTAP's released segmentation evaluation [0] (and the Leopart / NeCo
linear probe [1]), scaled down for small datasets:

- the backbone is frozen and its dense features are cached once
  (:func:`~lightly_cotap.eval.features.extract_dense_features`);
- the head is a 1x1 convolution from the feature dimension to the number of classes,
  by default preceded by a BatchNorm (DINOv2's BNHead). The BatchNorm does not change
  what a linear probe can express (it is affine per channel), only how fast Adam gets
  there: with a few hundred steps, features whose channels have small or uneven
  scales leave a plain 1x1 conv far from converged. Measured on the copy-paste scenes
  of ``benchmarks/dense_quality.py`` with features that hold the exact one-hot class
  of every patch: 32% mIoU after 300 steps without the BatchNorm, 80% with it (2000
  plain steps: 80%). ``use_bn=False`` gives CoTAP's plain head [0];
- logits are upsampled bilinearly to the label size and trained with cross-entropy
  that ignores ``ignore_index`` (255); applying the 1x1 conv before upsampling is
  equivalent to Leopart's upsample-then-conv because both operations are linear;
- Adam, constant learning rate 3e-3 as in [0];
- the reported number is the mIoU of the **last** step on the validation set, argmax
  over classes, no matching. (CoTAP reports the best validation mIoU over training,
  which is optimistic; it is not offered here.)

Deviations, because the features are cached: no random-crop / flip augmentation
during probe training, and the default number of steps is small (500 Adam steps of
32 images instead of 100k samples).

- [0]: Wen et al., Semantic Concentration for Self-Supervised Dense Representations
  Learning, 2025, https://arxiv.org/abs/2509.09429
- [1]: Ziegler and Asano, Self-Supervised Learning of Object Parts for Semantic
  Segmentation (Leopart), 2022, https://arxiv.org/abs/2204.13101
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightly_cotap.eval.features import DenseFeatures
from lightly_cotap.eval.metrics import (
    AbsentClasses,
    confusion_matrix,
    metrics_from_confusion,
)
from lightly_cotap.eval.progress import Progress, progress_bar


class LinearSegmentationProbe(nn.Module):
    """Linear classifier on channel-last dense features, logits upsampled to label size.

    The classifier is a 1x1 convolution (after an optional BatchNorm2d, DINOv2's
    BNHead) applied to the features moved to channel-first, the layout these layers
    take.

    Attributes:
        in_channels: Feature dimension C.
        num_classes: Number of classes K.
        use_bn: Whether a BatchNorm2d precedes the 1x1 conv.
    """

    def __init__(self, in_channels: int, num_classes: int, use_bn: bool = True) -> None:
        """Initializes the probe.

        Args:
            in_channels: Feature dimension C.
            num_classes: Number of classes K.
            use_bn: Put a BatchNorm2d before the 1x1 conv (DINOv2's BNHead).

        Raises:
            ValueError: If ``in_channels`` or ``num_classes`` is not positive.
        """
        super().__init__()
        if in_channels <= 0 or num_classes <= 0:
            raise ValueError(
                f"in_channels and num_classes must be positive, got {in_channels} and "
                f"{num_classes}."
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.use_bn = use_bn
        self.norm: nn.Module = nn.BatchNorm2d(in_channels) if use_bn else nn.Identity()
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, features: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Computes class logits.

        Args:
            features: Dense features, channel-last. Shape: (B, h, w, C).
            size: Output size (H_l, W_l); ``None`` keeps (h, w).

        Returns:
            Logits. Shape: (B, K, H_l, W_l).

        Raises:
            ValueError: If ``features`` does not have shape (B, h, w, in_channels).
        """
        if features.ndim != 4 or features.shape[-1] != self.in_channels:
            raise ValueError(
                f"features must have shape (B, h, w, {self.in_channels}), got "
                f"{tuple(features.shape)}."
            )
        # Contiguous channel-first: the memory layout the layers had, same numbers.
        channel_first = features.permute(0, 3, 1, 2).contiguous()
        logits: Tensor = self.classifier(self.norm(channel_first))
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(
                logits, size=size, mode="bilinear", align_corners=False
            )
        return logits


def train_linear_probe(
    train: DenseFeatures,
    num_classes: int,
    *,
    steps: int = 500,
    batch_size: int = 32,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    use_bn: bool = True,
    ignore_index: int = 255,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress = True,
) -> LinearSegmentationProbe:
    """Trains a :class:`LinearSegmentationProbe` on cached features with Adam.

    Args:
        train: Cached training features and masks.
        num_classes: Number of classes K.
        steps: Adam steps.
        batch_size: Images per step (the whole set if larger; then every step is
            full-batch).
        lr: Constant learning rate (CoTAP: 3e-3).
        weight_decay: Adam weight decay.
        use_bn: See :class:`LinearSegmentationProbe`.
        ignore_index: Mask value excluded from the loss.
        seed: Seeds the head initialisation and the batch sampling (the global RNG
            state is left untouched).
        device: Device to train on.
        progress: A tqdm bar (True), periodic lines ("lines") or nothing.

    Returns:
        The trained probe in eval mode, on ``device``.

    Raises:
        ValueError: If ``steps``, ``batch_size`` or ``lr`` is not positive.
    """
    if steps <= 0 or batch_size <= 0 or lr <= 0:
        raise ValueError(
            f"steps, batch_size and lr must be positive, got {steps}, {batch_size}, "
            f"{lr}."
        )
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearSegmentationProbe(
            train.features.shape[-1], num_classes, use_bn=use_bn
        ).to(device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    criterion = nn.CrossEntropyLoss(ignore_index=ignore_index)
    n = len(train)
    probe.train()
    for _ in progress_bar(range(steps), desc="linear probe", progress=progress):
        if batch_size >= n:
            idx = torch.arange(n)
        else:
            idx = torch.randperm(n, generator=generator)[:batch_size]
        feats = train.features[idx].to(device, torch.float32)
        masks = train.masks[idx].to(device)
        logits = probe(feats, size=train.label_size)
        if bool((masks != ignore_index).any()):
            loss = criterion(logits, masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return probe.eval()


@torch.no_grad()
def predict_linear_probe(
    probe: LinearSegmentationProbe,
    features: Tensor,
    size: tuple[int, int],
    *,
    batch_size: int = 64,
) -> Tensor:
    """Class predictions of a trained probe.

    Args:
        probe: Trained probe.
        features: Dense features, channel-last. Shape: (N, h, w, C).
        size: Label size (H_l, W_l).
        batch_size: Images per forward pass.

    Returns:
        Predicted class ids. Shape: (N, H_l, W_l), int64, on the CPU.
    """
    device = next(probe.parameters()).device
    preds = [
        probe(features[i : i + batch_size].to(device, torch.float32), size=size)
        .argmax(dim=1)
        .cpu()
        for i in range(0, features.shape[0], batch_size)
    ]
    return torch.cat(preds)


def linear_probe_miou(
    train: DenseFeatures,
    val: DenseFeatures,
    num_classes: int,
    *,
    steps: int = 500,
    batch_size: int = 32,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    use_bn: bool = True,
    ignore_index: int = 255,
    absent_classes: AbsentClasses = "zero",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress = True,
) -> dict[str, Any]:
    """Trains the linear probe on ``train`` and scores it on ``val``.

    Args:
        train: Cached training features and masks.
        val: Cached validation features and masks; scored at ``val.label_size``.
        num_classes: Number of classes K (including background).
        steps: See :func:`train_linear_probe`.
        batch_size: See :func:`train_linear_probe`.
        lr: See :func:`train_linear_probe`.
        weight_decay: See :func:`train_linear_probe`.
        use_bn: See :func:`train_linear_probe`.
        ignore_index: Mask value excluded from loss and metric.
        absent_classes: See :func:`~lightly_cotap.eval.metrics.metrics_from_confusion`.
        seed: See :func:`train_linear_probe`.
        device: See :func:`train_linear_probe`.
        progress: A tqdm bar (True), periodic lines ("lines") or nothing.

    Returns:
        Dict with ``miou``, ``pixel_accuracy``, ``iou_per_class``,
        ``num_present_classes`` and ``settings`` (the protocol actually run).

    Raises:
        ValueError: If train and val features have different channel counts.
    """
    if train.features.shape[-1] != val.features.shape[-1]:
        raise ValueError(
            f"train and val features must have the same channels, got "
            f"{train.features.shape[-1]} and {val.features.shape[-1]}."
        )
    probe = train_linear_probe(
        train,
        num_classes,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        use_bn=use_bn,
        ignore_index=ignore_index,
        seed=seed,
        device=device,
        progress=progress,
    )
    pred = predict_linear_probe(probe, val.features, val.label_size)
    conf = confusion_matrix(pred, val.masks, num_classes, ignore_index=ignore_index)
    result: dict[str, Any] = dict(
        metrics_from_confusion(conf, absent_classes=absent_classes)
    )
    result["settings"] = {
        "head": "bn+conv1x1" if use_bn else "conv1x1",
        "optimizer": "adam",
        "steps": steps,
        "batch_size": min(batch_size, len(train)),
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": seed,
        "select": "last",
        "feature_size": list(train.features.shape[1:3]),
        "train_label_size": list(train.label_size),
        "val_label_size": list(val.label_size),
        "num_train_images": len(train),
        "num_val_images": len(val),
        "absent_classes": absent_classes,
        "ignore_index": ignore_index,
    }
    return result
