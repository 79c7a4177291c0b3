"""Dense evaluation of frozen features: linear probe, k-means, retrieval, pictures."""

from __future__ import annotations

from lightly_cotap.eval.clustering import kmeans_segmentation
from lightly_cotap.eval.dense import evaluate_dense
from lightly_cotap.eval.features import (
    DenseFeatures,
    extract_dense_features,
)
from lightly_cotap.eval.linear_probe import (
    LinearSegmentationProbe,
    linear_probe_miou,
    train_linear_probe,
)
from lightly_cotap.eval.metrics import (
    confusion_matrix,
    greedy_match,
    hungarian_match,
    matched_metrics,
    metrics_from_confusion,
    segmentation_metrics,
)
from lightly_cotap.eval.model_features import dense_feature_fn
from lightly_cotap.eval.retrieval import retrieval_segmentation
from lightly_cotap.eval.visualize import (
    pca_rgb,
    save_dense_visualizations,
    save_image_grid,
    similarity_maps,
)

__all__ = [
    "DenseFeatures",
    "LinearSegmentationProbe",
    "confusion_matrix",
    "dense_feature_fn",
    "evaluate_dense",
    "extract_dense_features",
    "greedy_match",
    "hungarian_match",
    "kmeans_segmentation",
    "linear_probe_miou",
    "matched_metrics",
    "metrics_from_confusion",
    "pca_rgb",
    "retrieval_segmentation",
    "save_dense_visualizations",
    "save_image_grid",
    "segmentation_metrics",
    "similarity_maps",
    "train_linear_probe",
]
