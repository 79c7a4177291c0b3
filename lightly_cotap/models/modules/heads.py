"""Projection heads of CoTAP (thin named classes over Lightly's DINO head)."""

from __future__ import annotations

from lightly.models.modules.heads import DINOProjectionHead
from torch import Tensor, nn


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}.")


def _remove_bottleneck_bias(head: DINOProjectionHead) -> None:
    """Drops the bias of the bottleneck Linear, like the official CoTAP Projector."""
    bottleneck = head.layers[-1]
    assert isinstance(bottleneck, nn.Linear)
    bottleneck.register_parameter("bias", None)


class CoTAPPatchProjectionHead(DINOProjectionHead):
    """Patch projection head used in CoTAP [0].

    A DINO-style head [1]: Linear(input_dim -> 2048) - GELU - Linear(2048 -> 2048) -
    GELU - Linear(2048 -> 256), L2 normalisation, then a weight-normalised prototype
    layer Linear(256 -> 512, no bias) whose norm (``weight_g``) is fixed to 1
    (``norm_last_layer=True``), so the outputs are cosine scores to K = 512
    prototypes. No batch norm. Applied to every patch feature (width 2D with the
    object-aware filter, e.g. 768 for ViT-S).

    As in the official ``Projector``, the bottleneck layer Linear(2048 -> 256) has no
    bias (Lightly's DINO head has one; it is removed here).

    - [0]: Wen et al., Semantic Concentration for Self-Supervised Dense
      Representations Learning, 2025, https://arxiv.org/abs/2509.09429
    - [1]: DINO, 2021, https://arxiv.org/abs/2104.14294

    Attributes:
        input_dim: Input width (2D with the filter).
        hidden_dim: Hidden width of the MLP.
        bottleneck_dim: Width of the L2-normalised bottleneck.
        output_dim: Number K of patch prototypes.
        freeze_last_layer: Number of epochs during which the prototype layer is frozen
            (see ``cancel_last_layer_gradients``); -1 never freezes it.

    Examples:
        >>> head = CoTAPPatchProjectionHead(input_dim=768)
        >>> dense = torch.randn(2, 768, 14, 14)  # CoTAPVisionTransformer(...).dense
        >>> scores = head.forward_dense(dense)  # (2, 512, 14, 14)
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

        Raises:
            ValueError: If a dimension is not positive.
        """
        _check_dims(
            input_dim=input_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            output_dim=output_dim,
        )
        super().__init__(
            input_dim=input_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            output_dim=output_dim,
            batch_norm=False,
            freeze_last_layer=freeze_last_layer,
            norm_last_layer=True,
        )
        _remove_bottleneck_bias(self)

    def forward_dense(self, features: Tensor) -> Tensor:
        """Applies the head to every location of a feature map.

        Args:
            features: Dense features. Shape: (B, input_dim, H, W).

        Returns:
            Prototype scores. Shape: (B, output_dim, H, W).

        Raises:
            ValueError: If the input shape is invalid.
        """
        in_dim = self.layers[0].in_features
        if features.ndim != 4 or features.shape[1] != in_dim:
            raise ValueError(
                f"features must have shape (B, {in_dim}, H, W), got "
                f"{tuple(features.shape)}."
            )
        out: Tensor = self(features.permute(0, 2, 3, 1))
        return out.permute(0, 3, 1, 2)


class CoTAPClsProjectionHead(DINOProjectionHead):
    """CLS projection head used in CoTAP [0].

    Same DINO-style architecture [1] as :class:`CoTAPPatchProjectionHead` (2D -> 2048
    -> 2048 -> 256 without bias, L2 norm, weight-normalised prototype layer with
    ``weight_g`` fixed to 1, no batch norm) with K = 4096 prototypes, applied to the
    CLS token.

    - [0]: Wen et al., Semantic Concentration for Self-Supervised Dense
      Representations Learning, 2025, https://arxiv.org/abs/2509.09429
    - [1]: DINO, 2021, https://arxiv.org/abs/2104.14294

    Attributes:
        input_dim: Input width (2D with the filter).
        hidden_dim: Hidden width of the MLP.
        bottleneck_dim: Width of the L2-normalised bottleneck.
        output_dim: Number K of CLS prototypes.
        freeze_last_layer: Number of epochs during which the prototype layer is frozen;
            -1 never freezes it.
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

        Raises:
            ValueError: If a dimension is not positive.
        """
        _check_dims(
            input_dim=input_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            output_dim=output_dim,
        )
        super().__init__(
            input_dim=input_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            output_dim=output_dim,
            batch_norm=False,
            freeze_last_layer=freeze_last_layer,
            norm_last_layer=True,
        )
        _remove_bottleneck_bias(self)
