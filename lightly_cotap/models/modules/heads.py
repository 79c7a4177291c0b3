"""Projection heads of CoTAP (thin named classes over Lightly's DINO head)."""

from __future__ import annotations

import warnings

import torch
from lightly.models.modules.heads import DINOProjectionHead
from torch import Tensor, nn
from torch.nn.utils import parametrizations


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}.")


def _finalize_head(head: DINOProjectionHead) -> None:
    """Adapts Lightly's DINO head to the official CoTAP Projector.

    - Drops the bias of the bottleneck Linear (the official Projector has none).
    - Re-creates the weight-normalised prototype layer with
      ``torch.nn.utils.parametrizations.weight_norm`` (same function, norm fixed to 1)
      instead of the deprecated ``torch.nn.utils.weight_norm``, so that the head can be
      deep-copied for an EMA teacher.
    """
    bottleneck = head.layers[-1]
    assert isinstance(bottleneck, nn.Linear)
    bottleneck.register_parameter("bias", None)

    old = head.last_layer
    last = nn.Linear(old.in_features, old.out_features, bias=False)
    with torch.no_grad():
        last.weight.copy_(old.weight_v)
    last = parametrizations.weight_norm(last, name="weight", dim=0)
    norm = last.parametrizations.weight.original0
    with torch.no_grad():
        norm.fill_(1.0)
    norm.requires_grad_(False)
    head.last_layer = last


def _build_dino_head(
    head: DINOProjectionHead,
    input_dim: int,
    hidden_dim: int,
    bottleneck_dim: int,
    output_dim: int,
    freeze_last_layer: int,
) -> None:
    """Runs DINOProjectionHead.__init__ (silencing its weight_norm deprecation)."""
    _check_dims(
        input_dim=input_dim,
        hidden_dim=hidden_dim,
        bottleneck_dim=bottleneck_dim,
        output_dim=output_dim,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        DINOProjectionHead.__init__(
            head,
            input_dim=input_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            output_dim=output_dim,
            batch_norm=False,
            freeze_last_layer=freeze_last_layer,
            norm_last_layer=True,
        )
    _finalize_head(head)


class CoTAPPatchProjectionHead(DINOProjectionHead):
    """Patch projection head used in CoTAP [0].

    A DINO-style head [1]: Linear(input_dim -> 2048) - GELU - Linear(2048 -> 2048) -
    GELU - Linear(2048 -> 256), L2 normalisation, then a weight-normalised prototype
    layer Linear(256 -> 512, no bias) whose norm is fixed to 1 (DINO's
    ``norm_last_layer=True``: ``weight_g`` = 1 without gradient), so the outputs are
    cosine scores to K = 512 prototypes. No batch norm. Applied to every patch feature
    (width 2D with the object-aware filter, e.g. 768 for ViT-S).

    The prototype layer uses ``torch.nn.utils.parametrizations.weight_norm`` (the norm
    is ``last_layer.parametrizations.weight.original0``, the direction ``original1``)
    rather than the deprecated ``torch.nn.utils.weight_norm`` of Lightly's head, so
    that ``copy.deepcopy`` works for an EMA teacher head.

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
        _build_dino_head(
            self,
            input_dim=input_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            output_dim=output_dim,
            freeze_last_layer=freeze_last_layer,
        )

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
        _build_dino_head(
            self,
            input_dim=input_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            output_dim=output_dim,
            freeze_last_layer=freeze_last_layer,
        )
