"""Convolutional stem for a ViT's patch embedding (Xiao et al., 2021 [0]).

A ViT whose patch embedding is a stack of stride-2 3 x 3 convolutions instead of one
p x p convolution trains faster and more stably from scratch on small data [0]. The
stem keeps the interface of timm's patch embedding: :class:`ConvStem` *is* the final
1 x 1 projection ``nn.Conv2d`` (so the checkpoint key ``patch_embed.proj.weight`` and
every code path that reads ``patch_embed.proj`` keep working) and runs the strided
convolutions (``patch_embed.proj.stem.*``) before it.

- [0]: Xiao et al., Early Convolutions Help Transformers See Better, NeurIPS 2021,
  https://arxiv.org/abs/2106.14881
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn


class ConvStem(nn.Conv2d):
    """Stride-2 3 x 3 Conv-BN-ReLU layers followed by a 1 x 1 projection.

    ``log2(patch_size)`` strided layers with ``base_width``, 2x, 4x ... channels
    reduce the image by ``patch_size``; the 1 x 1 convolution (this module's own
    weight) maps to the token width.

    Attributes:
        image_channels: Channels of the input images.
        stem: The strided layers.

    Examples:
        >>> stem = ConvStem(3, 192, patch_size=8)
        >>> stem(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 192, 8, 8])
    """

    def __init__(
        self,
        image_channels: int,
        embed_dim: int,
        patch_size: int,
        base_width: int = 32,
    ) -> None:
        """Initializes the stem.

        Args:
            image_channels: Channels of the input images.
            embed_dim: Token width D of the ViT.
            patch_size: Total stride; a power of two >= 2.
            base_width: Channels of the first strided layer (doubled per layer).

        Raises:
            ValueError: If ``patch_size`` is not a power of two >= 2 or a width is
                not positive.
        """
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(
                f"patch_size must be a power of two >= 2, got {patch_size}."
            )
        if min(image_channels, embed_dim, base_width) <= 0:
            raise ValueError(
                "image_channels, embed_dim and base_width must be positive, got "
                f"{image_channels}, {embed_dim} and {base_width}."
            )
        num_layers = int(math.log2(patch_size))
        widths = [base_width * 2**i for i in range(num_layers)]
        super().__init__(widths[-1], embed_dim, kernel_size=1)
        layers: list[nn.Module] = []
        for in_ch, out_ch in zip([image_channels, *widths[:-1]], widths):
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
        self.stem = nn.Sequential(*layers)
        self.image_channels = image_channels

    def forward(self, images: Tensor) -> Tensor:
        """Embeds images.

        Args:
            images: Images. Shape: (B, C, H, W).

        Returns:
            Patch embeddings. Shape: (B, D, H / p, W / p).
        """
        return super().forward(self.stem(images))


def add_conv_stem(vit: Any, base_width: int = 32) -> None:
    """Replaces the patch projection of a timm ViT by a :class:`ConvStem` in place.

    Args:
        vit: A timm ``VisionTransformer`` with a ``patch_embed.proj`` convolution.
        base_width: Channels of the stem's first layer.
    """
    proj = vit.patch_embed.proj
    vit.patch_embed.proj = ConvStem(
        proj.in_channels,
        proj.out_channels,
        patch_size=int(vit.patch_embed.patch_size[0]),
        base_width=base_width,
    )
