"""lightly_cotap.data package."""

from lightly_cotap.data.sample_images import (
    SampleImageDataset,
    load_sample_images,
    sample_image_dir,
    sample_image_paths,
)
from lightly_cotap.data.semantic_pairs import (
    AugmentedPairDataset,
    NeighborIndex,
    SemanticPairDataset,
    cosine_topk_neighbors,
    embed_dataset,
)

__all__ = [
    "SampleImageDataset",
    "load_sample_images",
    "sample_image_dir",
    "sample_image_paths",
    "AugmentedPairDataset",
    "NeighborIndex",
    "SemanticPairDataset",
    "cosine_topk_neighbors",
    "embed_dataset",
]
