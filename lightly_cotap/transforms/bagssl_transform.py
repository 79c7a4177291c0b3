"""Fixed-scale patch views for BagSSL (intra-instance VICReg)."""

from __future__ import annotations

from lightly.transforms.gaussian_blur import GaussianBlur
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.transforms.solarize import RandomSolarization
from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL.Image import Image
from torch import Tensor


class BagSSLTransform(MultiViewTransform):
    """Implements the fixed-scale patch views of BagSSL [0].

    BagSSL (intra-instance VICReg) trains on ``n_patches`` random patches of the
    same fixed scale per image, which are mutual positives; the image embedding
    is the mean of the patch embeddings [0]. Use it with
    :class:`~lightly_cotap.loss.MultiPatchVICRegLoss` and
    :class:`~lightly_cotap.models.modules.BagOfPatchesAggregator`.

    Input to this transform:
        PIL Image or Tensor.

    Output of this transform:
        List of Tensor of length ``n_patches``.

    Applies the following augmentations by default:
        - Resize of the shorter image side to ``image_size``
        - Random crop of ``patch_size`` x ``patch_size`` pixels (or, with
          ``patch_scale``, a random square crop of that area fraction)
        - Optional resize of the patch to ``input_size``
        - Random horizontal flip
        - Color jitter
        - Random gray scale
        - Random solarization
        - Gaussian blur
        - ImageNet normalization

    Defaults: 16 patches of 32 x 32 pixels from images with a 224-pixel shorter
    side (the 32 x 32 ImageNet setting of [0]). Design decisions: 16 patches per
    image keep a batch of 16 x B patches within the memory of a usual VICReg batch;
    the augmentation strengths are those of the authors' follow-up EMP-SSL code
    [1] (colour jitter 0.4/0.4/0.4/0.2 with p=0.8, gray scale 0.2, blur 0.1,
    solarization 0.1), the closest published recipe for fixed-scale patches by
    the same group.

    - [0]: Chen et al., Bag of Image Patch Embedding Behind the Success of
      Self-Supervised Learning, 2023, https://arxiv.org/abs/2206.08954
    - [1]: EMP-SSL, 2023, https://arxiv.org/abs/2304.03977

    Attributes:
        n_patches:
            Number of patches (views) per image.
        patch_size:
            Side of the square patches in pixels, after resizing the image to
            ``image_size``. Exclusive with ``patch_scale``.
        patch_scale:
            Area of the square patches as a fraction of the image area (EMP-SSL
            style). Exclusive with ``patch_size``; needs ``input_size``.
        image_size:
            Shorter side the image is resized to before cropping; None keeps the
            image size.
        input_size:
            Side the patches are resized to; None keeps ``patch_size``.
        cj_prob:
            Probability that color jitter is applied.
        cj_strength:
            Strength of the color jitter. `cj_bright`, `cj_contrast`, `cj_sat`, and
            `cj_hue` are multiplied by this value.
        cj_bright:
            How much to jitter brightness.
        cj_contrast:
            How much to jitter contrast.
        cj_sat:
            How much to jitter saturation.
        cj_hue:
            How much to jitter hue.
        random_gray_scale:
            Probability of conversion to grayscale.
        solarize_prob:
            Probability of solarization.
        gaussian_blur:
            Probability of Gaussian blur.
        sigmas:
            Tuple of min and max value from which the std of the gaussian kernel is
            sampled.
        vf_prob:
            Probability that vertical flip is applied.
        hf_prob:
            Probability that horizontal flip is applied.
        normalize:
            Dictionary with 'mean' and 'std' for torchvision.transforms.Normalize.
    """

    def __init__(
        self,
        n_patches: int = 16,
        patch_size: int | None = 32,
        patch_scale: float | None = None,
        image_size: int | None = 224,
        input_size: int | None = None,
        cj_prob: float = 0.8,
        cj_strength: float = 1.0,
        cj_bright: float = 0.4,
        cj_contrast: float = 0.4,
        cj_sat: float = 0.4,
        cj_hue: float = 0.2,
        random_gray_scale: float = 0.2,
        solarize_prob: float = 0.1,
        gaussian_blur: float = 0.1,
        sigmas: tuple[float, float] = (0.1, 2.0),
        vf_prob: float = 0.0,
        hf_prob: float = 0.5,
        normalize: dict[str, list[float]] | None = IMAGENET_NORMALIZE,
    ) -> None:
        """Initializes the BagSSLTransform; see the class docstring for the args.

        Raises:
            ValueError: If ``n_patches < 1`` or the patch geometry is invalid
                (see :class:`BagSSLViewTransform`).
        """
        if n_patches < 1:
            raise ValueError(f"n_patches must be positive, got {n_patches}.")
        view_transform = BagSSLViewTransform(
            patch_size=patch_size,
            patch_scale=patch_scale,
            image_size=image_size,
            input_size=input_size,
            cj_prob=cj_prob,
            cj_strength=cj_strength,
            cj_bright=cj_bright,
            cj_contrast=cj_contrast,
            cj_sat=cj_sat,
            cj_hue=cj_hue,
            random_gray_scale=random_gray_scale,
            solarize_prob=solarize_prob,
            gaussian_blur=gaussian_blur,
            sigmas=sigmas,
            vf_prob=vf_prob,
            hf_prob=hf_prob,
            normalize=normalize,
        )
        self.n_patches = n_patches
        super().__init__(transforms=[view_transform] * n_patches)


class BagSSLViewTransform:
    """Transforms an image into a single fixed-scale patch view for BagSSL [0].

    Used by :class:`BagSSLTransform` to create the patches of an image; see there
    for the arguments.

    Input to this transform:
        PIL Image or Tensor.

    Output of this transform:
        Tensor of shape (3, input_size, input_size), with input_size defaulting
        to patch_size.

    - [0]: Chen et al., Bag of Image Patch Embedding Behind the Success of
      Self-Supervised Learning, 2023, https://arxiv.org/abs/2206.08954
    """

    def __init__(
        self,
        patch_size: int | None = 32,
        patch_scale: float | None = None,
        image_size: int | None = 224,
        input_size: int | None = None,
        cj_prob: float = 0.8,
        cj_strength: float = 1.0,
        cj_bright: float = 0.4,
        cj_contrast: float = 0.4,
        cj_sat: float = 0.4,
        cj_hue: float = 0.2,
        random_gray_scale: float = 0.2,
        solarize_prob: float = 0.1,
        gaussian_blur: float = 0.1,
        sigmas: tuple[float, float] = (0.1, 2.0),
        vf_prob: float = 0.0,
        hf_prob: float = 0.5,
        normalize: dict[str, list[float]] | None = IMAGENET_NORMALIZE,
    ) -> None:
        """Initializes the BagSSLViewTransform; see :class:`BagSSLTransform`.

        Raises:
            ValueError: If not exactly one of ``patch_size`` and ``patch_scale``
                is given, a size is not positive, ``patch_size > image_size``,
                ``patch_scale`` is not in (0, 1], or ``patch_scale`` is used
                without ``input_size``.
        """
        if (patch_size is None) == (patch_scale is None):
            raise ValueError(
                "Pass exactly one of patch_size and patch_scale, got "
                f"patch_size={patch_size} and patch_scale={patch_scale}."
            )
        for name, size in (
            ("patch_size", patch_size),
            ("image_size", image_size),
            ("input_size", input_size),
        ):
            if size is not None and size < 1:
                raise ValueError(f"{name} must be positive, got {size}.")
        if (
            patch_size is not None
            and image_size is not None
            and patch_size > image_size
        ):
            raise ValueError(
                f"patch_size={patch_size} must not exceed image_size={image_size}."
            )
        crop: list[object] = []
        if image_size is not None:
            crop.append(T.Resize(image_size))
        if patch_scale is not None:
            if not 0 < patch_scale <= 1:
                raise ValueError(f"patch_scale must be in (0, 1], got {patch_scale}.")
            if input_size is None:
                raise ValueError("patch_scale needs input_size (the output side).")
            crop.append(
                T.RandomResizedCrop(
                    size=input_size,
                    scale=(patch_scale, patch_scale),
                    ratio=(1.0, 1.0),
                )
            )
        else:
            crop.append(T.RandomCrop(size=patch_size, pad_if_needed=True))
            if input_size is not None and input_size != patch_size:
                crop.append(T.Resize((input_size, input_size)))
        color_jitter = T.ColorJitter(
            brightness=cj_strength * cj_bright,
            contrast=cj_strength * cj_contrast,
            saturation=cj_strength * cj_sat,
            hue=cj_strength * cj_hue,
        )
        transform = [
            *crop,
            T.RandomHorizontalFlip(p=hf_prob),
            T.RandomVerticalFlip(p=vf_prob),
            T.RandomApply([color_jitter], p=cj_prob),
            T.RandomGrayscale(p=random_gray_scale),
            RandomSolarization(prob=solarize_prob),
            GaussianBlur(prob=gaussian_blur, sigmas=sigmas),
            T.ToTensor(),
        ]
        if normalize:
            transform += [T.Normalize(mean=normalize["mean"], std=normalize["std"])]
        self.transform = T.Compose(transform)

    def __call__(self, image: Tensor | Image) -> Tensor:
        """Applies the transforms to the input image.

        Args:
            image:
                The input image to apply the transforms to.

        Returns:
            The transformed patch.
        """
        transformed: Tensor = self.transform(image)
        return transformed
