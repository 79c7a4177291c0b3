"""lightly_cotap.data package."""

from lightly_cotap.data.copy_paste_scenes import CopyPasteScenes
from lightly_cotap.data.copy_paste_sources import (
    debian_backgrounds,
    tuxpaint_class_folders,
)
from lightly_cotap.data.embedding import default_embedding_transform, embed_dataset
from lightly_cotap.data.neighbors import NeighborIndex, cosine_topk_neighbors
from lightly_cotap.data.sample_images import (
    SampleImageDataset,
    load_sample_images,
    sample_image_dir,
    sample_image_paths,
)
from lightly_cotap.data.segmentation_folder import SegmentationFolder
from lightly_cotap.data.semantic_pairs import AugmentedPairDataset, SemanticPairDataset

__all__ = [
    "CopyPasteScenes",
    "SampleImageDataset",
    "SegmentationFolder",
    "debian_backgrounds",
    "tuxpaint_class_folders",
    "load_sample_images",
    "sample_image_dir",
    "sample_image_paths",
    "AugmentedPairDataset",
    "NeighborIndex",
    "SemanticPairDataset",
    "cosine_topk_neighbors",
    "default_embedding_transform",
    "embed_dataset",
]
