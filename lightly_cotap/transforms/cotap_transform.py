"""Leopart-style multi-crop for CoTAP that also returns the crop boxes.

The boxes let dense features of two crops of the same image be aligned with
RoI-align (``lightly.loss.roi_resample_to_grid`` / ``torchvision.ops.roi_align``).

Image boxes are ``(x0, y0, x1, y1)`` in continuous pixel coordinates of the
original (untransformed) image: ``x`` runs along the width, ``y`` along the height,
the image spans ``[0, W] x [0, H]`` and pixel ``(r, c)`` covers
``[c, c + 1] x [r, r + 1]``. A crop with box ``(x0, y0, x1, y1)`` contains the
original pixels with columns ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1``; the crop is
resized to ``crop_size x crop_size`` afterwards, so a box may have any aspect ratio.
The grid boxes and the alignment of crop features are in
:mod:`lightly_cotap.transforms.crop_alignment`.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence, TypedDict, Union

import torch
from lightly.transforms.gaussian_blur import GaussianBlur
from lightly.transforms.torchvision_v2_compatibility import functional as F
from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL.Image import Image
from torch import Tensor


class CoTAPViews(TypedDict):
    """Output of :class:`CoTAPTransform` for one image (a plain ``dict`` at runtime).

    With ``V = 2 + n_local_views`` crops, ordered ``[global_0, global_1, local_0, ...]``.
    PyTorch's default collate turns a list of these into a dict of batched tensors
    (shapes with a leading batch dimension ``B`` given after the arrow).

    Keys:
        student: List of ``V`` tensors, the colour-augmented crops. Shape
            ``(3, global_crop_size, global_crop_size)`` for the two global crops and
            ``(3, local_crop_size, local_crop_size)`` for the local crops.
            -> list of ``V`` tensors of shape ``(B, 3, S, S)``.
        teacher: List of 2 tensors, the two global crops with the *same* geometry as
            ``student[0]``, ``student[1]`` but without colour augmentation (only
            to-tensor and normalisation). Shape ``(3, global_crop_size,
            global_crop_size)``. -> list of 2 tensors ``(B, 3, S, S)``.
        boxes: Crop boxes ``(x0, y0, x1, y1)`` in original-image pixel coordinates,
            float32. Shape ``(V, 4)``. -> ``(B, V, 4)``.
        flipped: Whether each crop was flipped horizontally. Shape ``(V,)``, bool.
            -> ``(B, V)``.
        image_size: ``(H, W)`` of the original image, float32. Shape ``(2,)``.
            -> ``(B, 2)``.
    """

    student: list[Tensor]
    teacher: list[Tensor]
    boxes: Tensor
    flipped: Tensor
    image_size: Tensor


class CoTAPTransform:
    """Implements the multi-crop augmentation with crop boxes used by CoTAP [0].

    The geometric part follows Leopart [1] as used in the official CoTAP code:
    two global crops and ``n_local_views`` local crops (RandomResizedCrop
    parameters), where every crop must overlap every global crop by at least
    ``min_intersection`` of the image area and the two global crops must overlap
    each other by at least ``2 * min_intersection``. A crop that violates this is
    re-sampled (at most ``max_tries`` times, see below). The box of every crop in
    original-image pixels is returned, so that features of two crops can be
    RoI-aligned on their intersection with
    :func:`~lightly_cotap.transforms.crop_pair_grid_boxes` and
    :func:`~lightly_cotap.transforms.resample_crop_features`.

    Input to this transform:
        PIL Image or Tensor of shape ``(C, H, W)`` (float in ``[0, 1]`` or uint8).

    Output of this transform:
        A :class:`CoTAPViews` dict ``{"student": [V tensors], "teacher": [2 tensors],
        "boxes": (V, 4), "flipped": (V,), "image_size": (2,)}`` with
        ``V = 2 + n_local_views``; see :class:`CoTAPViews` for the shapes. It
        contains only tensors and lists of tensors, so the default PyTorch collate
        batches it.

    Applies the following augmentations by default:
        - Random resized crop with the overlap constraint (bilinear, antialiased)
        - Student views only: colour jitter, random gray scale, Gaussian blur
        - ImageNet normalization (student and teacher views)

    Teacher views are the global crops without colour augmentation, as in the
    official code, where colour augmentation is applied to the student batch only.
    No flip is applied by default (the official Leopart transform has none); with
    ``hf_prob > 0`` a crop and its teacher view are flipped together and the flag
    is returned in ``flipped``, which
    :func:`~lightly_cotap.transforms.crop_pair_grid_boxes` and
    :func:`~lightly_cotap.transforms.resample_crop_features` take into account.

    Differences to the official code: colour augmentation is drawn independently
    per crop here (the official code applies one torchvision draw to a whole
    crop-batch tensor on the GPU), and Gaussian blur uses PIL's blur with a sigma
    in ``sigmas`` instead of a fixed 7x7 kernel. The overlap re-sampling is bounded
    by ``max_tries``: after that many failures the last crop is moved (size kept)
    so that it is centred on the intersection of the global crops sampled so far,
    which guarantees a non-empty overlap; a warning is emitted if even that crop
    misses the ``min_intersection`` threshold.

    - [0]: CoTAP, 2025, https://arxiv.org/abs/2509.09429
    - [1]: Leopart, 2022, https://arxiv.org/abs/2204.13101

    Attributes:
        global_crop_size: Output size (pixels) of the two global crops.
        global_crop_scale: Min and max area fraction of the image covered by a
            global crop.
        local_crop_size: Output size (pixels) of the local crops.
        local_crop_scale: Min and max area fraction of the image covered by a local
            crop.
        n_local_views: Number of local crops.
        crop_ratio: Min and max aspect ratio (width / height) of the crop boxes.
        min_intersection: Minimum overlap of each crop with each global crop, as a
            fraction of the image area (doubled between the two global crops).
        max_tries: Maximum number of samples per crop for the overlap constraint.
        hf_prob: Probability that a crop is flipped horizontally.
        cj_prob: Probability that colour jitter is applied (student views).
        cj_strength: Strength of the colour jitter; `cj_bright`, `cj_contrast`,
            `cj_sat` and `cj_hue` are multiplied by it.
        cj_bright: How much to jitter brightness.
        cj_contrast: How much to jitter contrast.
        cj_sat: How much to jitter saturation.
        cj_hue: How much to jitter hue.
        random_gray_scale: Probability of conversion to grayscale (student views).
        gaussian_blur: Probability of Gaussian blur (student views).
        sigmas: Min and max standard deviation of the Gaussian blur.
        normalize: Dictionary with 'mean' and 'std' for
            torchvision.transforms.Normalize, or None for no normalization.

    Examples:
        >>> from torch.utils.data import DataLoader
        >>> from lightly_cotap.data import SampleImageDataset
        >>> from lightly_cotap.transforms import (
        ...     CoTAPTransform, crop_pair_grid_boxes, resample_crop_features
        ... )
        >>> transform = CoTAPTransform()
        >>> loader = DataLoader(SampleImageDataset(transform=transform), batch_size=4)
        >>> views, _ = next(iter(loader))
        >>> views["student"][0].shape, views["boxes"].shape
        (torch.Size([4, 3, 224, 224]), torch.Size([4, 6, 4]))
        >>> # Align the channel-last ViT-S/16 features (B, h, w, C) of global crop 0
        >>> # (14x14) and local crop 2 (6x6).
        >>> box_0, box_2, valid = crop_pair_grid_boxes(views["boxes"], 0, 2, 14, 6)
        >>> f0 = resample_crop_features(features_0, box_0, 6, 6)  # (B, 36, C)
        >>> f2 = resample_crop_features(features_2, box_2, 6, 6)  # same locations
    """

    def __init__(
        self,
        global_crop_size: int = 224,
        global_crop_scale: tuple[float, float] = (0.25, 1.0),
        local_crop_size: int = 96,
        local_crop_scale: tuple[float, float] = (0.05, 0.1),
        n_local_views: int = 4,
        crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        min_intersection: float = 0.01,
        max_tries: int = 100,
        hf_prob: float = 0.0,
        cj_prob: float = 0.8,
        cj_strength: float = 1.0,
        cj_bright: float = 0.8,
        cj_contrast: float = 0.8,
        cj_sat: float = 0.8,
        cj_hue: float = 0.2,
        random_gray_scale: float = 0.2,
        gaussian_blur: float = 0.5,
        sigmas: tuple[float, float] = (0.1, 2.0),
        normalize: dict[str, list[float]] | None = IMAGENET_NORMALIZE,
    ) -> None:
        """Initializes the CoTAPTransform with the specified parameters.

        Raises:
            ValueError: If a size, scale, ratio, count or probability is invalid.
        """
        for name, size in (
            ("global_crop_size", global_crop_size),
            ("local_crop_size", local_crop_size),
        ):
            if size <= 0:
                raise ValueError(f"{name} must be positive but is {size}.")
        for name, scale in (
            ("global_crop_scale", global_crop_scale),
            ("local_crop_scale", local_crop_scale),
        ):
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(
                    f"{name} must be (min, max) with 0 < min <= max <= 1 "
                    f"but is {scale}."
                )
        if len(crop_ratio) != 2 or not 0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(
                f"crop_ratio must be (min, max) with 0 < min <= max but is "
                f"{crop_ratio}."
            )
        if n_local_views < 0:
            raise ValueError(
                f"n_local_views must be non-negative but is {n_local_views}."
            )
        if not 0 <= min_intersection < 0.5:
            raise ValueError(
                f"min_intersection must be in [0, 0.5) but is {min_intersection}."
            )
        if max_tries < 1:
            raise ValueError(f"max_tries must be at least 1 but is {max_tries}.")
        for name, prob in (
            ("hf_prob", hf_prob),
            ("cj_prob", cj_prob),
            ("random_gray_scale", random_gray_scale),
            ("gaussian_blur", gaussian_blur),
        ):
            if not 0 <= prob <= 1:
                raise ValueError(f"{name} must be in [0, 1] but is {prob}.")

        self.global_crop_size = global_crop_size
        self.global_crop_scale = global_crop_scale
        self.local_crop_size = local_crop_size
        self.local_crop_scale = local_crop_scale
        self.n_local_views = n_local_views
        self.crop_ratio = crop_ratio
        self.min_intersection = min_intersection
        self.max_tries = max_tries
        self.hf_prob = hf_prob

        color_jitter = T.ColorJitter(
            brightness=cj_strength * cj_bright,
            contrast=cj_strength * cj_contrast,
            saturation=cj_strength * cj_sat,
            hue=cj_strength * cj_hue,
        )
        final: list[Any] = [T.ToTensor()]
        if normalize:
            final.append(T.Normalize(mean=normalize["mean"], std=normalize["std"]))
        student: list[Any] = []
        # Augmentations with probability 0 are left out, so that the student views
        # equal the teacher views exactly when colour augmentation is disabled
        # (Lightly's GaussianBlur round-trips tensors through PIL even with p=0).
        if cj_prob > 0:
            student.append(T.RandomApply([color_jitter], p=cj_prob))
        if random_gray_scale > 0:
            student.append(T.RandomGrayscale(p=random_gray_scale))
        if gaussian_blur > 0:
            student.append(GaussianBlur(prob=gaussian_blur, sigmas=sigmas))
        self.student_transform = T.Compose(student + final)
        self.teacher_transform = T.Compose(final)

    @property
    def n_views(self) -> int:
        """Number of student views ``V = 2 + n_local_views``."""
        return 2 + self.n_local_views

    @property
    def crop_sizes(self) -> list[int]:
        """Output size (pixels) of each of the ``V`` crops, in output order."""
        return [self.global_crop_size] * 2 + [self.local_crop_size] * (
            self.n_local_views
        )

    def __call__(self, image: Union[Tensor, Image]) -> CoTAPViews:
        """Crops and augments one image.

        Args:
            image: PIL Image, or Tensor of shape ``(C, H, W)``.

        Returns:
            A :class:`CoTAPViews` dict (see there for the shapes).
        """
        height, width = _image_size(image)
        boxes = self.sample_boxes(height=height, width=width)
        flipped = torch.rand(self.n_views) < self.hf_prob
        crops = []
        for box, size, flip in zip(boxes.tolist(), self.crop_sizes, flipped.tolist()):
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            crop = F.resized_crop(
                image,
                top=y0,
                left=x0,
                height=y1 - y0,
                width=x1 - x0,
                size=[size, size],
                interpolation=T.InterpolationMode.BILINEAR,
                antialias=True,
            )
            if flip:
                crop = F.hflip(crop)
            crops.append(crop)
        return {
            "student": [self.student_transform(crop) for crop in crops],
            "teacher": [self.teacher_transform(crop) for crop in crops[:2]],
            "boxes": boxes,
            "flipped": flipped,
            "image_size": torch.tensor([height, width], dtype=torch.float32),
        }

    def sample_boxes(self, *, height: int, width: int) -> Tensor:
        """Samples the boxes of all crops of an image with the overlap constraint.

        Args:
            height: Height ``H`` of the original image in pixels.
            width: Width ``W`` of the original image in pixels.

        Returns:
            Integer-valued float32 boxes ``(x0, y0, x1, y1)`` in original-image
            pixels, global crops first. Shape ``(V, 4)``.
        """
        area = float(height * width)
        boxes: list[tuple[int, int, int, int]] = []
        for i in range(self.n_views):
            is_global = i < 2
            scale = self.global_crop_scale if is_global else self.local_crop_scale
            globals_so_far = boxes[: min(i, 2)]
            threshold = self.min_intersection * area * (2.0 if is_global else 1.0)
            box = _random_box(height, width, scale, self.crop_ratio)
            tries = 1
            while not _overlaps(box, globals_so_far, threshold):
                if tries >= self.max_tries:
                    box = _centre_on_intersection(box, globals_so_far, height, width)
                    if not _overlaps(box, globals_so_far, threshold):
                        warnings.warn(
                            f"CoTAPTransform: crop {i} misses min_intersection="
                            f"{self.min_intersection} after {self.max_tries} tries "
                            f"on a {height}x{width} image; using a crop centred on "
                            "the global crops' intersection (non-empty overlap).",
                            stacklevel=2,
                        )
                    break
                box = _random_box(height, width, scale, self.crop_ratio)
                tries += 1
            boxes.append(box)
        return torch.tensor(boxes, dtype=torch.float32)


def _image_size(image: Union[Tensor, Image]) -> tuple[int, int]:
    """Returns ``(H, W)`` of a PIL image or a ``(..., H, W)`` tensor."""
    if isinstance(image, Tensor):
        if image.dim() < 2:
            raise ValueError(
                f"image tensor must have shape (C, H, W) but has shape "
                f"{tuple(image.shape)}."
            )
        return int(image.shape[-2]), int(image.shape[-1])
    width, height = image.size
    return int(height), int(width)


def _random_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """Samples RandomResizedCrop parameters and returns them as an image box."""
    dummy = torch.empty(0, height, width)  # get_params only reads the size
    top, left, h, w = T.RandomResizedCrop.get_params(dummy, list(scale), list(ratio))
    return (int(left), int(top), int(left + w), int(top + h))


def _intersection_area(
    a: Sequence[float],
    b: Sequence[float],
) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return float(max(w, 0) * max(h, 0))


def _overlaps(
    box: Sequence[float],
    others: Sequence[Sequence[float]],
    threshold: float,
) -> bool:
    """Whether ``box`` overlaps each of ``others`` by >= ``threshold`` (and > 0)."""
    return all(
        (inter := _intersection_area(box, other)) >= threshold and inter > 0
        for other in others
    )


def _centre_on_intersection(
    box: tuple[int, int, int, int],
    others: Sequence[tuple[int, int, int, int]],
    height: int,
    width: int,
) -> tuple[int, int, int, int]:
    """Moves ``box`` (size kept) to be centred on the intersection of ``others``."""
    x0 = max(o[0] for o in others)
    y0 = max(o[1] for o in others)
    x1 = min(o[2] for o in others)
    y1 = min(o[3] for o in others)
    w, h = box[2] - box[0], box[3] - box[1]
    left = min(max(int(round((x0 + x1) / 2 - w / 2)), 0), width - w)
    top = min(max(int(round((y0 + y1) / 2 - h / 2)), 0), height - h)
    return (left, top, left + w, top + h)
