"""In-context (retrieval) segmentation with a memory of labelled patches.

Hummingbird-style dense nearest-neighbour evaluation [0], following
open-hummingbird-eval [1]:

1. memory: the L2-normalised patch features of the training images, each with its
   patch label = the class histogram of the pixels inside the patch;
2. optionally bounded to ``memory_size`` patches: every image contributes
   ``memory_size // N`` patches, chosen by the lowest score
   ``noise * sum_{c in patch} (#patches of the image that contain c)`` with uniform
   noise, which favours patches of rare classes [1];
3. every query patch of a validation image takes its ``k = 30`` exact nearest
   neighbours by cosine similarity (chunked matmul + top-k; no approximate index);
4. label transfer: ``softmax(sim / 0.02)`` weighted sum of the neighbours' histograms;
5. the (h, w, C) class scores are upsampled bilinearly to the label size, argmax, and
   scored with mIoU (predictions are class ids, so no matching is needed).

Deviations, because the features are cached: no augmentation epochs while building
the memory, and pixels equal to ``ignore_index`` are left out of the histograms
(open-hummingbird-eval counts them as background); patches without any labelled
pixel are not stored.

- [0]: Balazevic et al., Towards In-context Scene Understanding (Hummingbird), 2023,
  https://arxiv.org/abs/2306.01667
- [1]: Pariza et al., open-hummingbird-eval, 2024,
  https://github.com/vpariza/open-hummingbird-eval
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightly_cotap.eval.features import DenseFeatures
from lightly_cotap.eval.metrics import (
    AbsentClasses,
    confusion_matrix,
    metrics_from_confusion,
)
from lightly_cotap.eval.progress import Progress, progress_bar


def patch_label_histograms(
    masks: Tensor,
    num_classes: int,
    size: tuple[int, int],
    *,
    ignore_index: int = 255,
    batch_size: int = 16,
) -> Tensor:
    """Fraction of the labelled pixels of every patch that belongs to every class.

    Args:
        masks: Label maps. Shape: (N, H, W).
        num_classes: Number of classes C.
        size: Patch grid (h, w); each cell averages the pixels it covers
            (adaptive average pooling).
        ignore_index: Pixels with this value are left out.
        batch_size: Images per chunk.

    Returns:
        Histograms that sum to 1, or to 0 for patches without labelled pixels.
        Shape: (N, C, h, w).
    """
    out = []
    for i in range(0, masks.shape[0], batch_size):
        m = masks[i : i + batch_size].long()
        valid = m != ignore_index
        onehot = F.one_hot(torch.where(valid, m, 0), num_classes).permute(0, 3, 1, 2)
        onehot = onehot.float() * valid[:, None].float()
        hist = F.adaptive_avg_pool2d(onehot, size)
        total = hist.sum(dim=1, keepdim=True)
        out.append(torch.where(total > 0, hist / total.clamp_min(1e-12), hist))
    return torch.cat(out)


def build_memory(
    train: DenseFeatures,
    num_classes: int,
    *,
    memory_size: int | None = None,
    ignore_index: int = 255,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Memory of L2-normalised training patch features and their label histograms.

    Args:
        train: Cached training features and masks.
        num_classes: Number of classes C.
        memory_size: Upper bound on the number of stored patches (``None``: all).
            When the training set has more labelled patches, each image contributes
            ``memory_size // N`` patches selected as in open-hummingbird-eval.
        ignore_index: Mask value left out of the histograms.
        seed: Seeds the selection noise.

    Returns:
        ``(keys, labels)``. Shapes: (M, C_feat) L2-normalised float32 and (M, C)
        histograms.

    Raises:
        ValueError: If ``memory_size`` is smaller than the number of images, or no
            patch has a labelled pixel.
    """
    n, h, w, c = train.features.shape
    if memory_size is not None and memory_size < n:
        raise ValueError(
            f"memory_size must be at least the number of images ({n}), got "
            f"{memory_size}."
        )
    hist = patch_label_histograms(
        train.masks, num_classes, (h, w), ignore_index=ignore_index
    )
    hist = hist.permute(0, 2, 3, 1).reshape(n, h * w, num_classes)
    keys = F.normalize(train.features.float().reshape(n, h * w, c), dim=-1)
    nonempty = hist.sum(dim=-1) > 0  # (N, h*w)
    if not bool(nonempty.any()):
        raise ValueError("no training patch contains a labelled pixel.")
    if memory_size is None or int(nonempty.sum()) <= memory_size:
        return keys[nonempty], hist[nonempty]
    per_image = memory_size // n
    generator = torch.Generator().manual_seed(seed)
    present = hist > 0  # (N, h*w, C)
    patches_per_class = present.sum(dim=1, keepdim=True).float()  # (N, 1, C)
    score = (present.float() * patches_per_class).sum(dim=-1)  # (N, h*w)
    score = score * torch.rand(score.shape, generator=generator)
    score = torch.where(nonempty, score, torch.full_like(score, float("inf")))
    order = score.argsort(dim=1)[:, :per_image]  # (N, per_image)
    keep = torch.gather(nonempty, 1, order)
    sel_keys = torch.gather(keys, 1, order[..., None].expand(-1, -1, c))[keep]
    sel_hist = torch.gather(hist, 1, order[..., None].expand(-1, -1, num_classes))
    return sel_keys, sel_hist[keep]


@torch.no_grad()
def retrieve_labels(
    queries: Tensor,
    keys: Tensor,
    labels: Tensor,
    *,
    k: int = 30,
    temperature: float = 0.02,
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Soft label transfer from the k nearest memory patches (cosine similarity).

    Args:
        queries: Query patch features (normalised inside). Shape: (Q, D).
        keys: L2-normalised memory features. Shape: (M, D).
        labels: Memory label histograms. Shape: (M, C).
        k: Neighbours per query (capped at M).
        temperature: Softmax temperature on the cosine similarities.
        chunk_size: Queries per similarity block (the block holds chunk_size * M
            floats); ``None`` picks ``2**25 // M`` (a 128 MB block).
        device: Device of the similarity computation.

    Returns:
        Class scores. Shape: (Q, C), on the CPU.

    Raises:
        ValueError: If ``k`` or ``temperature`` is not positive, or dims mismatch.
    """
    if k <= 0 or temperature <= 0:
        raise ValueError(f"k and temperature must be positive, got {k}, {temperature}.")
    if queries.shape[-1] != keys.shape[-1] or keys.shape[0] != labels.shape[0]:
        raise ValueError(
            f"queries (Q, D), keys (M, D) and labels (M, C) must agree, got "
            f"{tuple(queries.shape)}, {tuple(keys.shape)}, {tuple(labels.shape)}."
        )
    keys = keys.to(device, torch.float32)
    labels = labels.to(device, torch.float32)
    k = min(k, keys.shape[0])
    if chunk_size is None:
        chunk_size = max(1, 2**25 // keys.shape[0])
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    out = []
    for i in range(0, queries.shape[0], chunk_size):
        q = F.normalize(queries[i : i + chunk_size].to(device, torch.float32), dim=-1)
        sim, idx = (q @ keys.T).topk(k, dim=1)
        weights = torch.softmax(sim / temperature, dim=1)
        out.append(torch.einsum("qk,qkc->qc", weights, labels[idx]).cpu())
    return torch.cat(out)


def retrieval_segmentation(
    train: DenseFeatures,
    val: DenseFeatures,
    num_classes: int,
    *,
    k: int = 30,
    temperature: float = 0.02,
    memory_size: int | None = None,
    chunk_size: int | None = None,
    images_per_chunk: int = 16,
    ignore_index: int = 255,
    absent_classes: AbsentClasses = "zero",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress = True,
) -> dict[str, Any]:
    """Hummingbird-style in-context segmentation of ``val`` from a ``train`` memory.

    Args:
        train: Cached training features and masks (the memory).
        val: Cached validation features and masks (the queries).
        num_classes: Number of classes C.
        k: Nearest neighbours per query patch (30 in [0]).
        temperature: Softmax temperature (0.02 in [0]).
        memory_size: See :func:`build_memory`.
        chunk_size: See :func:`retrieve_labels`.
        images_per_chunk: Validation images whose class scores are upsampled at once.
        ignore_index: Mask value excluded from histograms and metric.
        absent_classes: See :func:`~lightly_cotap.eval.metrics.metrics_from_confusion`.
        seed: See :func:`build_memory`.
        device: See :func:`retrieve_labels`.
        progress: A tqdm bar (True), periodic lines ("lines") or nothing.

    Returns:
        Dict with ``miou``, ``pixel_accuracy``, ``iou_per_class``,
        ``num_present_classes`` and ``settings``.

    Raises:
        ValueError: If train and val features have different channel counts.
    """
    if train.features.shape[-1] != val.features.shape[-1]:
        raise ValueError(
            f"train and val features must have the same channels, got "
            f"{train.features.shape[-1]} and {val.features.shape[-1]}."
        )
    keys, labels = build_memory(
        train,
        num_classes,
        memory_size=memory_size,
        ignore_index=ignore_index,
        seed=seed,
    )
    n, h, w, c = val.features.shape
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    if images_per_chunk <= 0:
        raise ValueError(f"images_per_chunk must be positive, got {images_per_chunk}.")
    for i in progress_bar(
        range(0, n, images_per_chunk), desc="retrieval", progress=progress
    ):
        feats = val.features[i : i + images_per_chunk]
        b = feats.shape[0]
        queries = feats.reshape(-1, c)
        scores = retrieve_labels(
            queries,
            keys,
            labels,
            k=k,
            temperature=temperature,
            chunk_size=chunk_size,
            device=device,
        )
        scores = scores.reshape(b, h, w, num_classes).permute(0, 3, 1, 2)
        scores = F.interpolate(
            scores, size=val.label_size, mode="bilinear", align_corners=False
        )
        conf += confusion_matrix(
            scores.argmax(dim=1),
            val.masks[i : i + images_per_chunk],
            num_classes,
            ignore_index=ignore_index,
        )
    result: dict[str, Any] = dict(
        metrics_from_confusion(conf, absent_classes=absent_classes)
    )
    result["settings"] = {
        "k": min(k, int(keys.shape[0])),
        "temperature": temperature,
        "memory_size": int(keys.shape[0]),
        "memory_bound": memory_size,
        "seed": seed,
        "feature_size": [h, w],
        "label_size": list(val.label_size),
        "num_train_images": len(train),
        "num_val_images": n,
        "absent_classes": absent_classes,
        "ignore_index": ignore_index,
    }
    return result
