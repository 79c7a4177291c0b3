"""Extract and cache frozen dense features of a segmentation dataset.

Every dense evaluation in :mod:`lightly_cotap.eval` runs on a :class:`DenseFeatures`
cache: the backbone is run once (``torch.no_grad``, eval mode) over a dataset of
``(image, mask)`` pairs and the probes, the clustering and the retrieval reuse the
cached patch features, so a small CPU evaluation runs the backbone once.

The backbone is any callable ``feature_fn(images) -> dense features`` returning
channel-last features ``(B, h, w, D)``, the layout of Lightly's dense losses; for this
plugin's model :func:`~lightly_cotap.eval.model_features.dense_feature_fn` gives it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightly_cotap.eval.progress import Progress, progress_bar

FeatureFn = Callable[[Tensor], Tensor]


@dataclass
class DenseFeatures:
    """Cached dense features and label maps of a dataset.

    Attributes:
        features: Frozen dense features, channel-last. Shape: (N, h, w, D).
        masks: Ground-truth label maps at the label size, ``ignore_index`` for
            unlabelled pixels. Shape: (N, H_l, W_l), int64.
    """

    features: Tensor
    masks: Tensor

    def __post_init__(self) -> None:
        if self.features.ndim != 4:
            raise ValueError(
                f"features must have shape (N, h, w, D), got {tuple(self.features.shape)}."
            )
        if self.masks.ndim != 3 or self.masks.shape[0] != self.features.shape[0]:
            raise ValueError(
                f"masks must have shape (N, H, W) with N={self.features.shape[0]}, got "
                f"{tuple(self.masks.shape)}."
            )

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def label_size(self) -> tuple[int, int]:
        """Height and width of the cached label maps."""
        return int(self.masks.shape[1]), int(self.masks.shape[2])


def resize_masks(masks: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Nearest-neighbour resizing of integer label maps.

    Args:
        masks: Label maps. Shape: (N, H, W).
        size: Output size ``(H_l, W_l)`` or an int for a square size.

    Returns:
        Resized label maps. Shape: (N, H_l, W_l), int64.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[assignment]
    if tuple(masks.shape[-2:]) == size:
        return masks.long()
    # "nearest-exact" samples pixel centres, so label maps stay aligned with images.
    resized = F.interpolate(masks[:, None].float(), size=size, mode="nearest-exact")
    return resized[:, 0].round().long()


def _module_of(feature_fn: FeatureFn, module: nn.Module | None) -> nn.Module | None:
    if module is not None:
        return module
    return feature_fn if isinstance(feature_fn, nn.Module) else None


@torch.no_grad()
def extract_dense_features(
    feature_fn: FeatureFn,
    dataset: Dataset[tuple[Tensor, Tensor]] | Sequence[tuple[Tensor, Tensor]],
    *,
    label_size: int | tuple[int, int] | None = 100,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    module: nn.Module | None = None,
    feature_dtype: torch.dtype = torch.float32,
    progress: Progress = True,
    desc: str = "features",
) -> DenseFeatures:
    """Runs a frozen backbone once over a segmentation dataset and caches the result.

    The backbone runs under ``torch.no_grad()``; if ``module`` (or ``feature_fn``
    itself) is an ``nn.Module`` it is switched to eval mode and restored afterwards.

    Args:
        feature_fn: Maps a batch of images to dense features.
            Images: (B, 3, H, W); features, channel-last: (B, h, w, D).
        dataset: Indexable dataset of ``(image (3, H, W) float, mask (H, W) int)``
            pairs, all images of the same size.
        label_size: Size at which the masks are cached (nearest-neighbour); 100 is the
            Leopart/NeCo label resolution. ``None`` keeps the mask size.
        batch_size: Images per forward pass.
        num_workers: DataLoader workers.
        device: Device on which ``feature_fn`` runs; the cache is kept on the CPU.
        module: Module to put in eval mode while extracting, e.g. the model wrapped
            by a ``lambda``.
        feature_dtype: Dtype of the cached features (``torch.float16`` halves memory).
        progress: A tqdm bar (True), periodic lines ("lines") or nothing.
        desc: Label of the progress bar.

    Returns:
        The :class:`DenseFeatures` cache.

    Raises:
        ValueError: If ``batch_size`` is not positive, the dataset is empty, or the
            backbone does not return (B, h, w, D) features.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("dataset is empty.")
    mod = _module_of(feature_fn, module)
    was_training = mod.training if mod is not None else False
    if mod is not None:
        mod.eval()
    loader = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    features: list[Tensor] = []
    masks: list[Tensor] = []
    try:
        for images, batch_masks in progress_bar(loader, desc=desc, progress=progress):
            if images.ndim != 4 or batch_masks.ndim != 3:
                raise ValueError(
                    "dataset must yield images (3, H, W) and masks (H, W), got batches "
                    f"{tuple(images.shape)} and {tuple(batch_masks.shape)}."
                )
            feats = feature_fn(images.to(device))
            if feats.ndim != 4 or feats.shape[0] != images.shape[0]:
                raise ValueError(
                    f"feature_fn must return (B, h, w, D) features for B="
                    f"{images.shape[0]} images, got {tuple(feats.shape)}."
                )
            features.append(feats.detach().to("cpu", feature_dtype))
            batch_masks = batch_masks.long()
            if label_size is not None:
                batch_masks = resize_masks(batch_masks, label_size)
            masks.append(batch_masks)
    finally:
        if mod is not None:
            mod.train(was_training)
    return DenseFeatures(features=torch.cat(features), masks=torch.cat(masks))
