"""Confusion-matrix based segmentation metrics and cluster-to-class matching.

All metrics of :mod:`lightly_cotap.eval` go through one confusion matrix built with a
single ``bincount`` (as STEGO's ``UnsupervisedMetrics`` does), so mIoU, pixel accuracy,
Hungarian matching [1] and many-to-one overclustering matching [0, 2] agree on how
pixels are counted.

Absent classes follow the frozen linear probe protocol of Leopart [0] (``PredsmIoU``):
the IoU of a class is ``TP / (TP + FP + FN)`` and the mean runs over **all**
``num_classes`` classes; a class absent from both the ground truth and the prediction
(empty union) scores 0. Pass ``absent_classes="exclude"`` to drop such classes from the
mean instead (mmsegmentation's ``nanmean`` convention). A class absent from the ground
truth but predicted somewhere always scores 0 (its union is not empty).

Kept instead of torchmetrics: its macro Jaccard index always drops classes with an
empty union (no Leopart convention), computes in float32, and its confusion matrix is
square, while k-means scoring needs a C x K matrix.

- [0]: Ziegler and Asano, Self-Supervised Learning of Object Parts for Semantic
  Segmentation (Leopart), 2022, https://arxiv.org/abs/2204.13101
- [1]: Van Gansbeke et al., Unsupervised Semantic Segmentation by Contrasting Object
  Mask Proposals, 2021, https://arxiv.org/abs/2102.06191
- [2]: Pariza et al., Near, far: Patch-ordering enhances vision foundation models'
  scene understanding (NeCo), 2024, https://arxiv.org/abs/2408.11054
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

AbsentClasses = Literal["zero", "exclude"]


def confusion_matrix(
    pred: Tensor,
    target: Tensor,
    num_classes: int,
    *,
    num_pred_classes: int | None = None,
    ignore_index: int = 255,
) -> Tensor:
    """Counts (ground-truth class, predicted label) pairs over all non-ignored pixels.

    Args:
        pred: Predicted labels in ``[0, num_pred_classes)``. Any shape, integer dtype.
        target: Ground-truth labels in ``[0, num_classes)`` or ``ignore_index``.
            Same shape as ``pred``.
        num_classes: Number of ground-truth classes C.
        num_pred_classes: Number of predicted labels K (e.g. clusters). Defaults to
            ``num_classes``.
        ignore_index: Ground-truth value of pixels that are not scored.

    Returns:
        Confusion matrix ``conf[c, k]`` = number of pixels of class c predicted as k.
        Shape: (C, K), dtype int64, on the device of ``pred``.

    Raises:
        ValueError: If the shapes differ, a count is not positive, or a label is out
            of range.
    """
    if num_pred_classes is None:
        num_pred_classes = num_classes
    if num_classes <= 0 or num_pred_classes <= 0:
        raise ValueError(
            f"num_classes and num_pred_classes must be positive, got {num_classes} "
            f"and {num_pred_classes}."
        )
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}."
        )
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError(
            f"pred and target must be integer label maps, got {pred.dtype} and "
            f"{target.dtype}."
        )
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long().to(pred.device)
    valid = target != ignore_index
    pred = pred[valid]
    target = target[valid]
    if target.numel() > 0:
        if int(target.min()) < 0 or int(target.max()) >= num_classes:
            raise ValueError(
                f"target labels must lie in [0, {num_classes}) or equal ignore_index="
                f"{ignore_index}, got range [{int(target.min())}, {int(target.max())}]."
            )
        if int(pred.min()) < 0 or int(pred.max()) >= num_pred_classes:
            raise ValueError(
                f"pred labels must lie in [0, {num_pred_classes}), got range "
                f"[{int(pred.min())}, {int(pred.max())}]."
            )
    counts = torch.bincount(
        target * num_pred_classes + pred, minlength=num_classes * num_pred_classes
    )
    return counts.reshape(num_classes, num_pred_classes)


def iou_matrix(conf: Tensor) -> Tensor:
    """IoU of every ground-truth class with every predicted label.

    Args:
        conf: Confusion matrix from :func:`confusion_matrix`. Shape: (C, K).

    Returns:
        ``iou[c, k] = conf[c, k] / (|gt = c| + |pred = k| - conf[c, k])``, 0 where the
        union is empty. Shape: (C, K), float64.
    """
    conf = conf.double()
    union = conf.sum(dim=1, keepdim=True) + conf.sum(dim=0, keepdim=True) - conf
    return torch.where(union > 0, conf / union.clamp_min(1), torch.zeros_like(conf))


def metrics_from_confusion(
    conf: Tensor, *, absent_classes: AbsentClasses = "zero"
) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU of a square confusion matrix.

    Args:
        conf: Confusion matrix of class predictions. Shape: (C, C).
        absent_classes: ``"zero"`` (Leopart [0], default): classes with an empty union
            score 0 and count in the mean. ``"exclude"``: they are left out of the mean.

    Returns:
        Dict with ``miou`` (in [0, 1]), ``pixel_accuracy`` (correct / scored pixels),
        ``iou_per_class`` (list of C floats, NaN for excluded classes) and
        ``num_present_classes`` (classes with a non-empty union).

    Raises:
        ValueError: If ``conf`` is not square or ``absent_classes`` is unknown.
    """
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"conf must be square (C, C), got {tuple(conf.shape)}.")
    if absent_classes not in ("zero", "exclude"):
        raise ValueError(
            f"absent_classes must be 'zero' or 'exclude', got {absent_classes!r}."
        )
    conf = conf.double()
    tp = conf.diagonal()
    union = conf.sum(dim=0) + conf.sum(dim=1) - tp
    present = union > 0
    iou = tp / union.clamp_min(1)
    if absent_classes == "exclude":
        iou = torch.where(present, iou, torch.full_like(iou, float("nan")))
        miou = float(iou[present].mean()) if bool(present.any()) else 0.0
    else:
        miou = float(iou.mean())
    total = float(conf.sum())
    return {
        "miou": miou,
        "pixel_accuracy": float(tp.sum()) / total if total > 0 else 0.0,
        "iou_per_class": [float(v) for v in iou],
        "num_present_classes": int(present.sum()),
    }


def segmentation_metrics(
    pred: Tensor,
    target: Tensor,
    num_classes: int,
    *,
    ignore_index: int = 255,
    absent_classes: AbsentClasses = "zero",
) -> dict[str, Any]:
    """mIoU and pixel accuracy of class predictions (no matching).

    Args:
        pred: Predicted class ids. Any shape.
        target: Ground-truth class ids or ``ignore_index``. Same shape as ``pred``.
        num_classes: Number of classes C.
        ignore_index: Ground-truth value of unscored pixels.
        absent_classes: See :func:`metrics_from_confusion`.

    Returns:
        See :func:`metrics_from_confusion`.
    """
    conf = confusion_matrix(pred, target, num_classes, ignore_index=ignore_index)
    return metrics_from_confusion(conf, absent_classes=absent_classes)


def hungarian_match(conf: Tensor, *, unmatched_label: int = 0) -> Tensor:
    """One-to-one cluster-to-class assignment that maximises the total IoU.

    Solves ``linear_sum_assignment(1 - IoU)`` on the (C, K) IoU matrix, as Leopart's
    ``PredsmIoUKmeans`` [0] does. With K > C the clusters left unmatched are mapped to
    ``unmatched_label`` (the background class in [0]); with K < C some classes get no
    cluster.

    Args:
        conf: Confusion matrix of ground-truth classes vs clusters. Shape: (C, K).
        unmatched_label: Class assigned to clusters without a match.

    Returns:
        ``mapping[k]`` = class of cluster k. Shape: (K,), int64.

    Raises:
        ValueError: If ``conf`` is not 2-D or ``unmatched_label`` is out of range.
    """
    if conf.ndim != 2:
        raise ValueError(f"conf must have shape (C, K), got {tuple(conf.shape)}.")
    num_classes, num_clusters = conf.shape
    if not 0 <= unmatched_label < num_classes:
        raise ValueError(
            f"unmatched_label must lie in [0, {num_classes}), got {unmatched_label}."
        )
    iou = iou_matrix(conf).cpu().numpy()
    rows, cols = linear_sum_assignment(1.0 - iou)
    mapping = np.full(num_clusters, unmatched_label, dtype=np.int64)
    mapping[cols] = rows
    return torch.from_numpy(mapping)


def greedy_match(conf: Tensor, *, precision_based: bool = True) -> Tensor:
    """Many-to-one assignment for overclustering: each cluster goes to its best class.

    Following Leopart / NeCo [0, 2], every cluster is mapped to the ground-truth class
    that covers most of its pixels (highest precision; ``precision_based=True``, the
    setting both evaluation scripts use for overclustering) or with which it has the
    highest IoU (``precision_based=False``). Several clusters can map to the same
    class. IoU-based matching sends small clusters on object boundaries to the object
    class even when they hold mostly background (the background's large area makes
    its IoU with any small cluster tiny), so it is not the default.

    Args:
        conf: Confusion matrix of ground-truth classes vs clusters. Shape: (C, K).
        precision_based: Use precision (default) instead of IoU.

    Returns:
        ``mapping[k]`` = class of cluster k. Shape: (K,), int64.

    Raises:
        ValueError: If ``conf`` is not 2-D.
    """
    if conf.ndim != 2:
        raise ValueError(f"conf must have shape (C, K), got {tuple(conf.shape)}.")
    score = conf.double() if precision_based else iou_matrix(conf)
    return score.argmax(dim=0).cpu()


def remap_confusion(conf: Tensor, mapping: Tensor, num_classes: int) -> Tensor:
    """Confusion matrix after relabelling every cluster k as class ``mapping[k]``.

    Args:
        conf: Confusion matrix of ground-truth classes vs clusters. Shape: (C, K).
        mapping: Class of each cluster. Shape: (K,).
        num_classes: Number of classes C.

    Returns:
        Confusion matrix of classes vs relabelled predictions. Shape: (C, C).

    Raises:
        ValueError: If ``mapping`` does not have one entry per cluster.
    """
    if mapping.shape != (conf.shape[1],):
        raise ValueError(
            f"mapping must have shape ({conf.shape[1]},), got {tuple(mapping.shape)}."
        )
    onehot = torch.zeros(conf.shape[1], num_classes, dtype=conf.dtype)
    onehot[torch.arange(conf.shape[1]), mapping.long().cpu()] = 1
    return conf.cpu() @ onehot


def matched_metrics(
    conf: Tensor,
    *,
    matching: Literal["hungarian", "greedy"] = "hungarian",
    absent_classes: AbsentClasses = "zero",
    unmatched_label: int = 0,
    precision_based: bool = True,
) -> dict[str, Any]:
    """Metrics of cluster predictions after matching clusters to classes.

    Args:
        conf: Confusion matrix of ground-truth classes vs clusters. Shape: (C, K).
        matching: ``"hungarian"`` (one-to-one, :func:`hungarian_match`) or ``"greedy"``
            (many-to-one, :func:`greedy_match`).
        absent_classes: See :func:`metrics_from_confusion`.
        unmatched_label: See :func:`hungarian_match`.
        precision_based: See :func:`greedy_match`.

    Returns:
        The dict of :func:`metrics_from_confusion` plus ``mapping`` (class per cluster).

    Raises:
        ValueError: If ``matching`` is unknown.
    """
    if matching == "hungarian":
        mapping = hungarian_match(conf, unmatched_label=unmatched_label)
    elif matching == "greedy":
        mapping = greedy_match(conf, precision_based=precision_based)
    else:
        raise ValueError(f"matching must be 'hungarian' or 'greedy', got {matching!r}.")
    num_classes = conf.shape[0]
    result: dict[str, Any] = dict(
        metrics_from_confusion(
            remap_confusion(conf, mapping, num_classes), absent_classes=absent_classes
        )
    )
    result["mapping"] = [int(m) for m in mapping]
    return result
