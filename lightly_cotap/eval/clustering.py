"""Unsupervised segmentation by k-means on frozen patch features.

Protocol of Leopart's ``PredsmIoUKmeans`` [0] and NeCo's overclustering evaluation [1]
on the validation features only:

1. standardise each feature dimension (zero mean, unit std, eps 1e-5);
2. PCA to ``pca_dim`` (50) dimensions
   (:func:`~lightly_cotap.eval.pca.principal_components`);
3. Euclidean k-means (scikit-learn ``KMeans``, k-means++ init, ``n_init`` restarts,
   ``max_iter`` Lloyd iterations) with K = number of classes, or K > C for
   overclustering;
4. assign every pixel at the label size to its nearest centroid;
5. match clusters to classes: Hungarian (one-to-one) for K = C, greedy many-to-one
   (each cluster to the class covering most of its pixels) for K > C; mIoU and pixel
   accuracy over the C classes (:mod:`lightly_cotap.eval.metrics`).

Leopart upsamples the feature maps to 100x100 *before* clustering. Here k-means is fit
on the patch features (N * h * w vectors instead of N * 100 * 100, including patches
whose pixels are all ``ignore_index``), and pixels are assigned by bilinearly
upsampling the affine scores ``2 z.c_k - |c_k|^2``. Because standardisation, PCA and
bilinear interpolation are affine, this assignment is **exactly** the nearest centroid
of the upsampled feature, as in [0]; only the fitting set differs.

The Euclidean k-means is scikit-learn's; the project's spherical k-means in
:mod:`lightly_cotap.models.kmeans` serves the training losses.

- [0]: Ziegler and Asano, Self-Supervised Learning of Object Parts for Semantic
  Segmentation (Leopart), 2022, https://arxiv.org/abs/2204.13101
- [1]: Pariza et al., Near, far: Patch-ordering enhances vision foundation models'
  scene understanding (NeCo), 2024, https://arxiv.org/abs/2408.11054
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import Tensor

from lightly_cotap.eval.features import DenseFeatures
from lightly_cotap.eval.metrics import AbsentClasses, confusion_matrix, matched_metrics
from lightly_cotap.eval.pca import principal_components
from lightly_cotap.eval.progress import Progress, progress_bar


def fit_standardize_pca(
    x: Tensor, *, pca_dim: int | None = 50, standardize: bool = True, eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """Fits the affine map ``z = (x - mean) / std @ components``.

    Args:
        x: Vectors. Shape: (M, C).
        pca_dim: Number of principal components kept; ``None`` or ``>= C`` keeps all
            dimensions (no rotation).
        standardize: Divide by the per-dimension standard deviation.
        eps: Added to the standard deviation.

    Returns:
        ``(weight, bias)`` with ``z = x @ weight + bias``.
        Shapes: (C, d) and (d,), float64.

    Raises:
        ValueError: If ``x`` is not 2-D with at least two rows, or ``pca_dim`` < 1.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"x must have shape (M >= 2, C), got {tuple(x.shape)}.")
    if pca_dim is not None and pca_dim < 1:
        raise ValueError(f"pca_dim must be positive or None, got {pca_dim}.")
    x = x.double()
    mean = x.mean(dim=0)
    scale = x.std(dim=0) + eps if standardize else torch.ones_like(mean)
    weight = torch.diag(1.0 / scale)
    if pca_dim is not None and pca_dim < x.shape[1]:
        weight = weight @ principal_components((x - mean) / scale, pca_dim).T
    bias = -(mean @ weight)
    return weight, bias


def fit_kmeans(
    x: Tensor,
    num_clusters: int,
    *,
    n_init: int = 5,
    max_iter: int = 50,
    seed: int = 0,
) -> Tensor:
    """Euclidean k-means (scikit-learn ``KMeans``, k-means++ initialisation).

    Args:
        x: Vectors. Shape: (M, d).
        num_clusters: Number of clusters K.
        n_init: Restarts; the run with the lowest inertia is kept.
        max_iter: Lloyd iterations per restart.
        seed: Random state.

    Returns:
        Centroids. Shape: (K, d), float64.

    Raises:
        ValueError: If ``num_clusters`` is not in ``[1, M]``.
    """
    if not 1 <= num_clusters <= x.shape[0]:
        raise ValueError(
            f"num_clusters must lie in [1, {x.shape[0]}] (number of vectors), got "
            f"{num_clusters}."
        )
    kmeans = KMeans(
        n_clusters=num_clusters, n_init=n_init, max_iter=max_iter, random_state=seed
    )
    kmeans.fit(x.double().numpy())
    return torch.from_numpy(np.asarray(kmeans.cluster_centers_, dtype=np.float64))


@torch.no_grad()
def assign_clusters(
    features: Tensor,
    weight: Tensor,
    bias: Tensor,
    centroids: Tensor,
    size: tuple[int, int],
    *,
    batch_size: int = 8,
) -> Tensor:
    """Nearest-centroid label of every pixel of bilinearly upsampled feature maps.

    Args:
        features: Dense features, channel-last. Shape: (N, h, w, C).
        weight: Affine map from :func:`fit_standardize_pca`. Shape: (C, d).
        bias: Affine offset. Shape: (d,).
        centroids: Centroids in the mapped space. Shape: (K, d).
        size: Output size (H_l, W_l).
        batch_size: Images per chunk (bounds memory at batch_size * K * H_l * W_l).

    Returns:
        Cluster ids. Shape: (N, H_l, W_l), int64.
    """
    # Score of cluster k for a mapped vector z: 2 z.c_k - |c_k|^2, affine in x.
    proj = 2.0 * weight @ centroids.T  # (C, K)
    offset = 2.0 * bias @ centroids.T - (centroids**2).sum(dim=1)  # (K,)
    proj32, offset32 = proj.float(), offset.float()
    out = []
    for i in range(0, features.shape[0], batch_size):
        f = features[i : i + batch_size].float()
        scores = (
            torch.einsum("bhwc,ck->bkhw", f, proj32) + offset32[None, :, None, None]
        )
        if tuple(scores.shape[-2:]) != tuple(size):
            scores = F.interpolate(
                scores, size=size, mode="bilinear", align_corners=False
            )
        out.append(scores.argmax(dim=1))
    return torch.cat(out)


def kmeans_segmentation(
    val: DenseFeatures,
    num_classes: int,
    *,
    num_clusters: int | None = None,
    matching: Literal["auto", "hungarian", "greedy"] = "auto",
    precision_based: bool = True,
    pca_dim: int | None = 50,
    standardize: bool = True,
    n_init: int = 5,
    max_iter: int = 50,
    max_fit_vectors: int | None = 200_000,
    seed: int = 0,
    ignore_index: int = 255,
    absent_classes: AbsentClasses = "zero",
    progress: Progress = True,
) -> dict[str, Any]:
    """Clusters the patch features of a dataset and scores the clusters as segments.

    Args:
        val: Cached features and masks (the clustering uses no training labels).
        num_classes: Number of ground-truth classes C.
        num_clusters: K; defaults to C. K > C is overclustering.
        matching: ``"hungarian"`` (one-to-one; unmatched clusters become class 0),
            ``"greedy"`` (many-to-one) or ``"auto"`` (Hungarian if K <= C, else greedy).
        precision_based: Greedy matching by precision (Leopart / NeCo) rather than
            IoU, see :func:`~lightly_cotap.eval.metrics.greedy_match`.
        pca_dim: PCA dimensions (``None``: no PCA).
        standardize: Standardise features before PCA.
        n_init: k-means restarts.
        max_iter: k-means iterations.
        max_fit_vectors: Fit k-means on at most this many random patch vectors
            (``None``: all); every pixel is still assigned.
        seed: Seeds subsampling and k-means.
        ignore_index: Mask value excluded from the metric.
        absent_classes: See :func:`~lightly_cotap.eval.metrics.metrics_from_confusion`.
        progress: A tqdm bar (True), periodic lines ("lines") or nothing.

    Returns:
        Dict with ``miou``, ``pixel_accuracy``, ``iou_per_class``,
        ``num_present_classes``, ``mapping`` (class of every cluster) and
        ``settings``.

    Raises:
        ValueError: If ``num_clusters`` or ``matching`` is invalid.
    """
    k = num_classes if num_clusters is None else num_clusters
    if k <= 0:
        raise ValueError(f"num_clusters must be positive, got {num_clusters}.")
    if matching == "auto":
        matching = "hungarian" if k <= num_classes else "greedy"
    if matching not in ("hungarian", "greedy"):
        raise ValueError(
            f"matching must be 'auto', 'hungarian' or 'greedy', got {matching!r}."
        )
    n, h, w, c = val.features.shape
    x = val.features.reshape(-1, c)
    if max_fit_vectors is not None and x.shape[0] > max_fit_vectors:
        generator = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(x.shape[0], generator=generator)[:max_fit_vectors]]
    weight, bias = fit_standardize_pca(x, pca_dim=pca_dim, standardize=standardize)
    with progress_bar(total=1, desc=f"k-means K={k}", progress=progress) as bar:
        centroids = fit_kmeans(
            x.double() @ weight + bias, k, n_init=n_init, max_iter=max_iter, seed=seed
        )
        bar.update()
    clusters = assign_clusters(val.features, weight, bias, centroids, val.label_size)
    conf = confusion_matrix(
        clusters,
        val.masks,
        num_classes,
        num_pred_classes=k,
        ignore_index=ignore_index,
    )
    result: dict[str, Any] = dict(
        matched_metrics(
            conf,
            matching=matching,
            absent_classes=absent_classes,
            precision_based=precision_based,
        )
    )
    result["settings"] = {
        "num_clusters": k,
        "matching": matching,
        "precision_based": precision_based if matching == "greedy" else None,
        "pca_dim": pca_dim,
        "standardize": standardize,
        "n_init": n_init,
        "max_iter": max_iter,
        "num_fit_vectors": int(x.shape[0]),
        "seed": seed,
        "feature_size": [h, w],
        "label_size": list(val.label_size),
        "num_images": n,
        "absent_classes": absent_classes,
        "ignore_index": ignore_index,
    }
    return result
