"""Segmentation dataset read from an image folder and a mask folder.

Images and masks are paired by file stem (``images/0001.jpg`` <-> ``masks/0001.png``).
Masks are single-channel images whose pixel values are class ids (0 = background
where the dataset has one, 255 = ignore); palette PNGs (as in VOC) are read as their
palette indices. Images are read with :func:`~lightly_cotap.data.image_io.read_rgb_image`
(16-bit, palette, CMYK and alpha images are converted correctly).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from lightly_cotap.data.image_io import IMAGE_EXTENSIONS, read_rgb_image, to_rgb

#: Modes of masks read as class ids (others are converted to ``L``).
MASK_MODES = ("L", "P", "I", "I;16")


def imagenet_mean_std() -> tuple[list[float], list[float]]:
    """ImageNet normalisation constants (Lightly's ``IMAGENET_NORMALIZE``).

    Returns:
        ``(mean, std)`` per RGB channel.
    """
    return list(IMAGENET_NORMALIZE["mean"]), list(IMAGENET_NORMALIZE["std"])


def image_to_tensor(
    image: Image.Image,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Tensor:
    """Converts a PIL image to a normalised float RGB tensor (torchvision's functions).

    Args:
        image: Image of any mode (converted with
            :func:`~lightly_cotap.data.image_io.to_rgb`).
        mean: Per-channel mean; ``None`` with ``std=None`` uses ImageNet's.
        std: Per-channel standard deviation.

    Returns:
        Normalised image. Shape: (3, H, W), float32.
    """
    if mean is None or std is None:
        mean, std = imagenet_mean_std()
    tensor = TF.to_tensor(to_rgb(image))
    normalized: Tensor = TF.normalize(tensor, mean=list(mean), std=list(std))
    return normalized


def _size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else size
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be positive, got {size}.")
    return h, w


class SegmentationFolder(Dataset[tuple[Tensor, Tensor]]):
    """Pairs of ``(image, mask)`` from two folders with matching file stems.

    Attributes:
        samples: Sorted ``(image path, mask path)`` pairs.
        image_size: ``(H, W)`` every sample is resized to (image bilinear, mask
            nearest), or ``None`` to keep the file sizes (then batching needs equal
            sizes).
        label_mapping: Function applied to every mask's label array, or ``None``.

    Examples:
        >>> dataset = SegmentationFolder("scenes/test/images", "scenes/test/masks")
        >>> image, mask = dataset[0]  # (3, 224, 224) float, (224, 224) int64
    """

    def __init__(
        self,
        images: str | Path,
        masks: str | Path,
        *,
        image_size: int | tuple[int, int] | None = 224,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        label_mapping: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """Initializes the dataset and pairs the files.

        Args:
            images: Folder of images (any mode, read as RGB).
            masks: Folder of label masks (same stems as the images).
            image_size: Output size (int for square), ``None`` keeps file sizes.
            mean: Normalisation mean; ``None`` uses ImageNet's.
            std: Normalisation standard deviation; ``None`` uses ImageNet's.
            label_mapping: Optional function applied to every mask's label array
                (e.g. mapping 0/255 binary masks to 0/1).

        Raises:
            ValueError: If a folder does not exist, holds no images, or an image has no
                mask of the same stem.
        """
        images, masks = Path(images), Path(masks)
        for name, folder in (("images", images), ("masks", masks)):
            if not folder.is_dir():
                raise ValueError(f"{name} folder {str(folder)!r} does not exist.")
        image_files = {
            p.stem: p
            for p in sorted(images.iterdir())
            if p.suffix.lower() in IMAGE_EXTENSIONS
        }
        mask_files = {
            p.stem: p
            for p in sorted(masks.iterdir())
            if p.suffix.lower() in IMAGE_EXTENSIONS
        }
        if not image_files:
            raise ValueError(f"no images found in {str(images)!r}.")
        missing = sorted(set(image_files) - set(mask_files))
        if missing:
            raise ValueError(
                f"{len(missing)} images in {str(images)!r} have no mask in "
                f"{str(masks)!r} (matching file stems), e.g. {missing[:3]}."
            )
        self.samples = [(image_files[s], mask_files[s]) for s in sorted(image_files)]
        self.image_size = _size(image_size)
        self.mean = mean
        self.std = std
        self.label_mapping = label_mapping

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """Loads one sample.

        Args:
            index: Sample index.

        Returns:
            ``(image, mask)``. Shapes: (3, H, W) float32 normalised, (H, W) int64.

        Raises:
            ValueError: If the mask's size differs from its image's (a mask of
                another image or with height and width swapped is never resized
                to fit).
            UnreadableImageError: If the image cannot be decoded.
        """
        image_path, mask_path = self.samples[index]
        image = read_rgb_image(image_path)
        with Image.open(mask_path) as raw_mask:
            mask: Image.Image = raw_mask.copy()
        if mask.mode not in MASK_MODES:
            mask = mask.convert("L")
        if mask.size != image.size:
            raise ValueError(
                f"mask {str(mask_path)!r} has size {mask.size}, its image "
                f"{str(image_path)!r} has {image.size} (width, height)."
            )
        if self.image_size is not None:
            size = (self.image_size[1], self.image_size[0])
            image = image.resize(size, Image.Resampling.BILINEAR)
            mask = mask.resize(size, Image.Resampling.NEAREST)
        mask_arr = np.asarray(mask).astype(np.int64)
        if self.label_mapping is not None:
            mask_arr = self.label_mapping(mask_arr)
        return (
            image_to_tensor(image, mean=self.mean, std=self.std),
            torch.from_numpy(mask_arr),
        )
