"""lightly_cotap.data package."""

from lightly_cotap.data.sample_images import (
    SampleImageDataset,
    load_sample_images,
    sample_image_dir,
    sample_image_paths,
)

__all__ = [
    "SampleImageDataset",
    "load_sample_images",
    "sample_image_dir",
    "sample_image_paths",
]
