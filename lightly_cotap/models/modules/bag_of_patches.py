"""BagSSL aggregation: an image embedding as the mean of its patch embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def aggregate_patch_embeddings(embeddings: Tensor) -> Tensor:
    """Returns the BagSSL image embedding: the mean of the patch embeddings [0].

    Use the embeddings *before* the projector (backbone outputs); [0] finds them
    better than the projections for evaluation.

    - [0]: Chen et al., Bag of Image Patch Embedding Behind the Success of
      Self-Supervised Learning, 2023, https://arxiv.org/abs/2206.08954

    Args:
        embeddings:
            Embeddings of n patches per image. Shape: (B, n, D)

    Returns:
        Image embeddings. Shape: (B, D)

    Raises:
        ValueError: If ``embeddings`` is not 3-D or has no patches.
    """
    if embeddings.ndim != 3 or embeddings.shape[1] == 0:
        raise ValueError(
            "embeddings must have shape (B, n, D) with n >= 1, got "
            f"{tuple(embeddings.shape)}."
        )
    return embeddings.mean(dim=1)


def grid_patches(images: Tensor, patch_size: int, stride: int | None = None) -> Tensor:
    """Cuts every image into a regular grid of square patches (sliding window).

    The evaluation-time patch sampler of BagSSL [0]: patches every ``stride``
    pixels, starting at the top-left corner.

    - [0]: Chen et al., Bag of Image Patch Embedding Behind the Success of
      Self-Supervised Learning, 2023, https://arxiv.org/abs/2206.08954

    Args:
        images:
            Images. Shape: (B, C, H, W)
        patch_size:
            Side of the patches in pixels.
        stride:
            Step between patches; defaults to ``patch_size`` (no overlap).

    Returns:
        Patches in row-major order, n = (floor((H - p) / s) + 1) *
        (floor((W - p) / s) + 1). Shape: (B, n, C, patch_size, patch_size)

    Raises:
        ValueError: If ``images`` is not 4-D, or the patch size or stride is not
            positive or the patches do not fit into the images.
    """
    stride = patch_size if stride is None else stride
    if images.ndim != 4:
        raise ValueError(
            f"images must have shape (B, C, H, W), got {tuple(images.shape)}."
        )
    if patch_size < 1 or stride < 1:
        raise ValueError(
            f"patch_size and stride must be positive, got {patch_size} and {stride}."
        )
    b, c, h, w = images.shape
    if patch_size > min(h, w):
        raise ValueError(
            f"patch_size={patch_size} does not fit into images of size {h} x {w}."
        )
    columns = F.unfold(images, kernel_size=patch_size, stride=stride)  # (B, C*p*p, n)
    return columns.transpose(1, 2).reshape(b, -1, c, patch_size, patch_size)


class BagOfPatchesAggregator(nn.Module):
    """Embeds the patches of each image with a backbone and averages them (BagSSL) [0].

    A drop-in feature extractor for kNN and linear probes of any model: the image
    representation is the mean of the backbone embeddings of its patches, e.g.
    from :class:`~lightly_cotap.transforms.BagSSLTransform` views or from
    :func:`grid_patches`.

    - [0]: Chen et al., Bag of Image Patch Embedding Behind the Success of
      Self-Supervised Learning, 2023, https://arxiv.org/abs/2206.08954

    Attributes:
        backbone:
            Module mapping (N, C, h, w) patches to embeddings; outputs with more
            than two dimensions, e.g. (N, D, 1, 1), are flattened to (N, D).
        chunk_size:
            Maximum number of patches per backbone call; None embeds all at once.

    Examples:
        >>> aggregator = BagOfPatchesAggregator(backbone, chunk_size=256)
        >>> patches = grid_patches(images, patch_size=32, stride=16)
        >>> features = aggregator(patches)  # (B, D)
    """

    def __init__(self, backbone: nn.Module, chunk_size: int | None = None) -> None:
        """Initializes the BagOfPatchesAggregator.

        Args:
            backbone: Embeds a batch of patches (N, C, h, w) into (N, D) (or
                (N, D, 1, 1), flattened).
            chunk_size: Patches per backbone call (bounds the memory); None embeds
                all patches of the batch at once.

        Raises:
            ValueError: If ``chunk_size`` is not positive.
        """
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
        self.backbone = backbone
        self.chunk_size = chunk_size

    def embed_patches(self, patches: Tensor | Sequence[Tensor]) -> Tensor:
        """Embeds every patch.

        Args:
            patches:
                Patches as a tensor, or a sequence of n (B, C, h, w) tensors (the
                collated output of :class:`~lightly_cotap.transforms.BagSSLTransform`).
                Shape: (B, n, C, h, w)

        Returns:
            Patch embeddings. Shape: (B, n, D)

        Raises:
            ValueError: If the patches are not (B, n, C, h, w).
        """
        if not isinstance(patches, Tensor):
            patches = torch.stack(list(patches), dim=1)
        if patches.ndim != 5 or patches.shape[1] == 0:
            raise ValueError(
                "patches must have shape (B, n, C, h, w) with n >= 1, got "
                f"{tuple(patches.shape)}."
            )
        b, n = patches.shape[:2]
        flat = patches.flatten(0, 1)
        chunk = flat.shape[0] if self.chunk_size is None else self.chunk_size
        embeddings = torch.cat(
            [self.backbone(part).flatten(1) for part in flat.split(chunk)]
        )
        return embeddings.reshape(b, n, -1)

    def forward(self, patches: Tensor | Sequence[Tensor]) -> Tensor:
        """Returns the mean patch embedding of every image.

        Args:
            patches:
                See :meth:`embed_patches`. Shape: (B, n, C, h, w)

        Returns:
            Image embeddings. Shape: (B, D)
        """
        return aggregate_patch_embeddings(self.embed_patches(patches))
