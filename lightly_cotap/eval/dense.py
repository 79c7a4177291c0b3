"""One call that runs every dense evaluation on a frozen backbone.

:func:`evaluate_dense` extracts the dense features of a labelled training set and a
validation set once, then runs the linear segmentation probe, k-means (K = C, with
Hungarian matching), overclustering (K > C, greedy many-to-one matching) and
Hummingbird-style retrieval on the cached features, and optionally writes PCA /
similarity pictures of a few validation images. It returns one JSON-serialisable dict;
the ``lightly-cotap eval`` command prints and saves it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightly_cotap.data.segmentation_folder import imagenet_mean_std
from lightly_cotap.eval.clustering import kmeans_segmentation
from lightly_cotap.eval.features import FeatureFn, extract_dense_features
from lightly_cotap.eval.linear_probe import linear_probe_miou
from lightly_cotap.eval.metrics import AbsentClasses
from lightly_cotap.eval.progress import Progress
from lightly_cotap.eval.retrieval import retrieval_segmentation
from lightly_cotap.eval.visualize import save_dense_visualizations

SegmentationSet = Dataset[tuple[Tensor, Tensor]] | Sequence[tuple[Tensor, Tensor]]


def evaluate_dense(
    feature_fn: FeatureFn,
    train_set: SegmentationSet,
    val_set: SegmentationSet,
    num_classes: int,
    *,
    label_size: int | tuple[int, int] | None = 100,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    module: nn.Module | None = None,
    ignore_index: int = 255,
    absent_classes: AbsentClasses = "zero",
    seed: int = 0,
    linear_probe: Mapping[str, Any] | None = None,
    kmeans: Mapping[str, Any] | None = None,
    overclustering_k: int | None = None,
    retrieval: Mapping[str, Any] | None = None,
    visualize_dir: str | Path | None = None,
    num_visualize: int = 8,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    progress: Progress = True,
) -> dict[str, Any]:
    """Runs the linear probe, k-means, overclustering and retrieval evaluations.

    Args:
        feature_fn: Frozen backbone, images (B, 3, H, W) -> channel-last dense
            features (B, h, w, D); for this plugin's model
            :func:`~lightly_cotap.eval.model_features.dense_feature_fn`.
        train_set: Labelled ``(image, mask)`` pairs for the probe and the retrieval
            memory.
        val_set: ``(image, mask)`` pairs that are scored (k-means uses only these).
        num_classes: Number of classes C including background; masks hold
            ``[0, C)`` or ``ignore_index``.
        label_size: Resolution of the cached masks at which every metric is computed
            (100 as Leopart / NeCo; ``None`` keeps the mask size).
        batch_size: Images per backbone forward pass.
        device: Device of the backbone (and of the probe / retrieval).
        module: Module to put in eval mode during extraction (when ``feature_fn`` is
            a lambda around a model).
        ignore_index: Unscored mask value.
        absent_classes: ``"zero"`` or ``"exclude"``, see
            :func:`~lightly_cotap.eval.metrics.metrics_from_confusion`.
        seed: Seed of every evaluation.
        linear_probe: Keyword arguments of
            :func:`~lightly_cotap.eval.linear_probe.linear_probe_miou` (e.g.
            ``{"steps": 1000}``); ``None`` uses the defaults. Pass ``{"skip": True}``
            to skip an evaluation (same for ``kmeans`` and ``retrieval``).
        kmeans: Keyword arguments of
            :func:`~lightly_cotap.eval.clustering.kmeans_segmentation` for both the
            K = C run and the overclustering run.
        overclustering_k: K of the overclustering run; ``None`` uses 4 * C, 0 skips it.
        retrieval: Keyword arguments of
            :func:`~lightly_cotap.eval.retrieval.retrieval_segmentation`.
        visualize_dir: If given, ``pca.png`` and ``similarity.png`` of the first
            ``num_visualize`` validation images are written there.
        num_visualize: Number of visualised validation images.
        image_mean: Normalisation mean of the dataset images (``None``: ImageNet), to
            draw the images.
        image_std: Normalisation std of the dataset images (``None``: ImageNet).
        progress: tqdm bars (True), periodic lines ("lines") or nothing.

    Returns:
        ``{"linear_probe": {...}, "kmeans": {...}, "overclustering": {...},
        "retrieval": {...}, "visualizations": {...}, "settings": {...}}``; each
        evaluation dict holds ``miou``, ``pixel_accuracy``, ``iou_per_class``, its
        ``settings`` and ``seconds``. Skipped evaluations are absent.

    Raises:
        ValueError: If ``num_classes`` is smaller than 2.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
    start = time.perf_counter()
    common: dict[str, Any] = dict(
        label_size=label_size,
        batch_size=batch_size,
        device=device,
        module=module,
        progress=progress,
    )
    train = extract_dense_features(
        feature_fn, train_set, desc="train features", **common
    )
    val = extract_dense_features(feature_fn, val_set, desc="val features", **common)
    results: dict[str, Any] = {}
    shared: dict[str, Any] = dict(
        ignore_index=ignore_index,
        absent_classes=absent_classes,
        seed=seed,
        progress=progress,
    )

    def run(name: str, kwargs: Mapping[str, Any] | None, fn: Any, *args: Any) -> None:
        options = dict(kwargs or {})
        if options.pop("skip", False):
            return
        t0 = time.perf_counter()
        results[name] = fn(*args, **{**shared, **options})
        results[name]["seconds"] = time.perf_counter() - t0

    run(
        "linear_probe",
        {"device": device, **(linear_probe or {})},
        linear_probe_miou,
        train,
        val,
        num_classes,
    )
    run("kmeans", kmeans, kmeans_segmentation, val, num_classes)
    over_k = 4 * num_classes if overclustering_k is None else overclustering_k
    if over_k > 0 and not (kmeans or {}).get("skip", False):
        run(
            "overclustering",
            {**(kmeans or {}), "num_clusters": over_k},
            kmeans_segmentation,
            val,
            num_classes,
        )
    run(
        "retrieval",
        {"device": device, **(retrieval or {})},
        retrieval_segmentation,
        train,
        val,
        num_classes,
    )
    if visualize_dir is not None and num_visualize > 0:
        count = min(num_visualize, len(val))
        if image_mean is None or image_std is None:
            image_mean, image_std = imagenet_mean_std()
        images = torch.stack([val_set[i][0] for i in range(count)])
        paths = save_dense_visualizations(
            images,
            val.features[:count],
            visualize_dir,
            mean=image_mean,
            std=image_std,
        )
        results["visualizations"] = {k: str(v) for k, v in paths.items()}
    results["settings"] = {
        "num_classes": num_classes,
        "num_train_images": len(train),
        "num_val_images": len(val),
        "feature_shape": list(val.features.shape[1:]),
        "label_size": list(val.label_size),
        "ignore_index": ignore_index,
        "absent_classes": absent_classes,
        "seed": seed,
        "seconds": time.perf_counter() - start,
    }
    return results
