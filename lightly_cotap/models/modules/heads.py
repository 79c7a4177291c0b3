"""Projection heads of CoTAP: DINO-style prototype heads on Lightly's ProjectionHead."""

from __future__ import annotations

import torch
from lightly.models.modules.heads import ProjectionHead
from torch import Tensor, nn
from torch.nn.utils import parametrizations


class CoTAPProjectionHead(ProjectionHead):
    """DINO-style prototype head [1] of the official CoTAP ``Projector`` [0].

    Linear(input_dim -> hidden_dim) - GELU - Linear(hidden_dim -> hidden_dim) -
    GELU - Linear(hidden_dim -> bottleneck_dim, no bias), L2 normalisation, then a
    weight-normalised prototype layer Linear(bottleneck_dim -> output_dim, no bias)
    whose norm is fixed to 1, so the outputs are cosine scores to ``output_dim``
    prototypes. No batch norm. The head applies to the last dimension, so it takes
    CLS features ``(B, input_dim)`` as well as channel-last dense features
    ``(B, H, W, input_dim)``.

    It is Lightly's :class:`~lightly.models.modules.DINOProjectionHead` with
    ``batch_norm=False`` and ``norm_last_layer=True`` (same initialisation:
    truncated normal with std 0.02 for the MLP, zero biases) with two design
    choices of the official ``Projector``:

    - The bottleneck Linear has no bias (Lightly's block tuple ``use_bias=False``).
    - The prototype layer uses ``torch.nn.utils.parametrizations.weight_norm`` (norm
      ``last_layer.parametrizations.weight.original0`` fixed to 1 without
      gradient, direction ``original1``) instead of the deprecated
      ``torch.nn.utils.weight_norm``, so that ``copy.deepcopy`` works for an EMA
      teacher head.

    - [0]: Wen et al., Semantic Concentration for Self-Supervised Dense
      Representations Learning, 2025, https://arxiv.org/abs/2509.09429
    - [1]: DINO, 2021, https://arxiv.org/abs/2104.14294

    Attributes:
        layers: The MLP up to the bottleneck.
        last_layer: The weight-normalised prototype layer.
        freeze_last_layer: Number of epochs during which the prototype layer is
            frozen (see :meth:`cancel_last_layer_gradients`); -1 never freezes it.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        output_dim: int,
        freeze_last_layer: int = -1,
    ) -> None:
        """Initializes the CoTAPProjectionHead with the specified dimensions.

        Args:
            input_dim: Input width (2D with the object-aware filter).
            hidden_dim: Hidden width of the MLP.
            bottleneck_dim: Width of the L2-normalised bottleneck.
            output_dim: Number of prototypes K.
            freeze_last_layer: Number of epochs during which the prototype layer is
                frozen; -1 never freezes it.

        Raises:
            ValueError: If a dimension is not positive.
        """
        dims = {
            "input_dim": input_dim,
            "hidden_dim": hidden_dim,
            "bottleneck_dim": bottleneck_dim,
            "output_dim": output_dim,
        }
        for name, value in dims.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}.")
        super().__init__(
            [
                (input_dim, hidden_dim, None, nn.GELU()),
                (hidden_dim, hidden_dim, None, nn.GELU()),
                (hidden_dim, bottleneck_dim, None, None, False),
            ]
        )
        for module in self.layers:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02, a=-2, b=2)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.freeze_last_layer = freeze_last_layer
        self.last_layer = parametrizations.weight_norm(
            nn.Linear(bottleneck_dim, output_dim, bias=False), name="weight", dim=0
        )
        norm = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            norm.fill_(1.0)
        norm.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        """Computes the prototype scores of every vector along the last dimension.

        Args:
            x: Features. Shape: (..., input_dim), e.g. (B, input_dim) or
                (B, H, W, input_dim).

        Returns:
            Cosine scores to the prototypes. Shape: (..., output_dim).
        """
        x = self.layers(x)
        x = nn.functional.normalize(x, dim=-1, p=2)
        scores: Tensor = self.last_layer(x)
        return scores

    def cancel_last_layer_gradients(self, current_epoch: int) -> None:
        """Drops the gradients of the prototype layer during the first epochs.

        Args:
            current_epoch: The current epoch; gradients are dropped while it is
                below ``freeze_last_layer``.
        """
        if current_epoch >= self.freeze_last_layer:
            return
        for param in self.last_layer.parameters():
            param.grad = None


class CoTAPPatchProjectionHead(CoTAPProjectionHead):
    """Patch projection head used in CoTAP [0].

    A :class:`CoTAPProjectionHead` with the official dimensions: input 2D with the
    object-aware filter (768 for ViT-S), hidden 2048, bottleneck 256 and K = 512
    patch prototypes. It applies to every position of the channel-last dense
    output of :class:`~lightly_cotap.models.CoTAPVisionTransformer`.

    - [0]: Wen et al., Semantic Concentration for Self-Supervised Dense
      Representations Learning, 2025, https://arxiv.org/abs/2509.09429

    Examples:
        >>> head = CoTAPPatchProjectionHead(input_dim=768)
        >>> dense = torch.randn(2, 14, 14, 768)  # CoTAPVisionTransformer(...).dense
        >>> scores = head(dense)  # (2, 14, 14, 512)
    """

    def __init__(
        self,
        input_dim: int = 768,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        output_dim: int = 512,
        freeze_last_layer: int = -1,
    ) -> None:
        """Initializes the CoTAPPatchProjectionHead with the specified dimensions.

        The arguments are those of :class:`CoTAPProjectionHead`; ``output_dim`` is
        the number K of patch prototypes.
        """
        super().__init__(
            input_dim=input_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            output_dim=output_dim,
            freeze_last_layer=freeze_last_layer,
        )


class CoTAPClsProjectionHead(CoTAPProjectionHead):
    """CLS projection head used in CoTAP [0].

    A :class:`CoTAPProjectionHead` with the official dimensions (input 2D with the
    object-aware filter, hidden 2048, bottleneck 256) and K = 4096 CLS prototypes,
    applied to the CLS feature.

    - [0]: Wen et al., Semantic Concentration for Self-Supervised Dense
      Representations Learning, 2025, https://arxiv.org/abs/2509.09429

    Examples:
        >>> head = CoTAPClsProjectionHead(input_dim=768)
        >>> scores = head(torch.randn(2, 768))  # (2, 4096)
    """

    def __init__(
        self,
        input_dim: int = 768,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        output_dim: int = 4096,
        freeze_last_layer: int = -1,
    ) -> None:
        """Initializes the CoTAPClsProjectionHead with the specified dimensions.

        The arguments are those of :class:`CoTAPProjectionHead`; ``output_dim`` is
        the number K of CLS prototypes.
        """
        super().__init__(
            input_dim=input_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            output_dim=output_dim,
            freeze_last_layer=freeze_last_layer,
        )
