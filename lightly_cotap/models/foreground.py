"""Foreground mask from the attention of a ViT's CLS token.

- [0]: Wen et al., Semantic Concentration for Self-Supervised Dense Representations
  Learning, 2025, https://arxiv.org/abs/2509.09429
- [1]: Caron et al., Emerging Properties in Self-Supervised Vision Transformers
  (DINO), 2021, https://arxiv.org/abs/2104.14294
- [2]: Ziegler and Asano, Self-Supervised Learning of Object Parts for Semantic
  Segmentation (Leopart), 2022, https://arxiv.org/abs/2204.13101
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

#: Rounding tolerance of the attention mass in foreground_mask_from_attention.
_MASS_TOLERANCE = 1e-6


def foreground_mask_from_attention(
    attention: Tensor,
    grid_size: tuple[int, int] | None = None,
    keep_mass: float = 0.6,
    blur_kernel_size: int = 7,
    blur_sigma: float = 0.6,
) -> Tensor:
    """Computes a binary foreground mask from attention maps.

    Follows DINO [1] / Leopart [2] as used by the CoTAP teacher [0]: the attention
    map is smoothed with a Gaussian blur and the smallest set of highest-attention
    patches that together hold ``keep_mass`` of the (blurred) attention mass is kept
    (up to a rounding tolerance of 1e-6 of the mass). Every kept patch has at least the
    (blurred) attention of every dropped patch.

    The blur uses reflect padding (torchvision's ``gaussian_blur``). For grids that
    are smaller than the kernel, the kernel size is reduced to the largest odd size
    that reflect padding supports (``2 * min(H, W) - 1``).

    Args:
        attention: Non-negative attention of the CLS token to the patches, usually
            averaged over heads. Shape: (B, N) with N = H * W, or (B, H, W).
        grid_size: The patch grid (H, W). Required for (B, N) input; for
            (B, H, W) input it is optional and must match.
        keep_mass: Fraction of the attention mass to keep, in (0, 1].
        blur_kernel_size: Size of the Gaussian kernel (odd). 1 disables the blur.
        blur_sigma: Standard deviation of the Gaussian kernel in patches.

    Returns:
        Boolean foreground mask. Shape: (B, H, W).

    Raises:
        ValueError: If the shapes or the arguments are invalid.
    """
    if not 0.0 < keep_mass <= 1.0:
        raise ValueError(f"keep_mass must be in (0, 1], got {keep_mass}.")
    if blur_kernel_size < 1 or blur_kernel_size % 2 == 0:
        raise ValueError(
            f"blur_kernel_size must be a positive odd integer, got {blur_kernel_size}."
        )
    if blur_sigma <= 0:
        raise ValueError(f"blur_sigma must be positive, got {blur_sigma}.")
    if attention.ndim == 3:
        height, width = int(attention.shape[1]), int(attention.shape[2])
        if grid_size is not None and tuple(grid_size) != (height, width):
            raise ValueError(
                f"grid_size {tuple(grid_size)} does not match the attention map "
                f"shape {tuple(attention.shape)}."
            )
    elif attention.ndim == 2:
        if grid_size is None:
            raise ValueError(
                "grid_size=(H, W) is required for attention of shape (B, N), got "
                f"shape {tuple(attention.shape)}."
            )
        height, width = int(grid_size[0]), int(grid_size[1])
        if height * width != attention.shape[1]:
            raise ValueError(
                f"grid_size {tuple(grid_size)} has {height * width} cells but the "
                f"attention has shape {tuple(attention.shape)}."
            )
    else:
        raise ValueError(
            "attention must have shape (B, N) or (B, H, W), got shape "
            f"{tuple(attention.shape)}."
        )

    batch_size = attention.shape[0]
    att = attention.detach().reshape(batch_size, 1, height, width)
    if att.dtype not in (torch.float32, torch.float64):
        att = att.float()
    kernel_size = min(blur_kernel_size, 2 * min(height, width) - 1)
    if kernel_size > 1 and batch_size > 0:
        att = gaussian_blur(
            att, kernel_size=[kernel_size, kernel_size], sigma=[blur_sigma, blur_sigma]
        )
    flat = att.reshape(batch_size, height * width).double()
    values, order = torch.sort(flat, dim=1, descending=True)
    total = values.sum(dim=1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    mass = values / total
    # Keep a patch if the mass of all patches with higher attention is below
    # keep_mass, i.e. the smallest prefix that reaches keep_mass (up to a 1e-6
    # tolerance against rounding).
    mass_before = torch.cumsum(mass, dim=1) - mass
    keep_sorted = mass_before < keep_mass - _MASS_TOLERANCE
    mask = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return mask.reshape(batch_size, height, width)
