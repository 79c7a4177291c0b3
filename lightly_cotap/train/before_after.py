"""The before/after picture of a training run: PCA maps of the dense features."""

from __future__ import annotations

from pathlib import Path

import torch
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import Tensor
from torchvision.transforms import functional as TF

from lightly_cotap.data import load_sample_images
from lightly_cotap.data.segmentation_folder import image_to_tensor
from lightly_cotap.eval.model_features import dense_feature_fn
from lightly_cotap.eval.visualize import pca_rgb, save_image_grid, to_uint8_images


def visualization_images(size: int, count: int = 4) -> Tensor:
    """Center crops of the embedded sample photos, ImageNet-normalised.

    Args:
        size: Side of the square crops in pixels.
        count: Number of photos.

    Returns:
        The images. Shape: (count, 3, size, size).
    """
    return torch.stack(
        [
            image_to_tensor(TF.center_crop(TF.resize(image, size), [size, size]))
            for image in load_sample_images()[:count]
        ]
    )


@torch.no_grad()
def dense_features(backbone: torch.nn.Module, images: Tensor) -> Tensor:
    """Dense features of images, computed in eval mode without gradients.

    Args:
        backbone: A :class:`~lightly_cotap.models.CoTAPVisionTransformer`; its
            training mode is restored afterwards.
        images: Normalised images. Shape: (B, 3, H, W).

    Returns:
        Channel-last float32 features on the CPU. Shape: (B, h, w, D).
    """
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    dense = dense_feature_fn(backbone)(images.to(device)).float().cpu()
    backbone.train(was_training)
    return dense


def save_before_after(
    images: Tensor, before: Tensor, after: Tensor, path: Path
) -> Path:
    """Writes each image next to the PCA maps of its features before and after.

    Args:
        images: ImageNet-normalised images. Shape: (B, 3, H, W).
        before: Dense features before training. Shape: (B, h, w, D).
        after: Dense features after training. Shape: (B, h, w, D).
        path: Output PNG (written atomically).

    Returns:
        The written path.
    """
    size = tuple(images.shape[-2:])
    rgb = to_uint8_images(
        images, mean=IMAGENET_NORMALIZE["mean"], std=IMAGENET_NORMALIZE["std"]
    )
    pca_before = pca_rgb(before, size=size)  # type: ignore[arg-type]
    pca_after = pca_rgb(after, size=size)  # type: ignore[arg-type]
    rows = [[img, b, a] for img, b, a in zip(rgb, pca_before, pca_after)]
    return save_image_grid(rows, path)
