"""Local (position-wise) projection and prediction heads of CO-SSL."""

from __future__ import annotations

from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from torch import Tensor


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if value < 1:
            raise ValueError(f"{name} must be positive, got {name}={value}.")


def _position_wise(head: BYOLProjectionHead | BYOLPredictionHead, x: Tensor) -> Tensor:
    """Applies a Lightly MLP head to every vector along the last dimension.

    The leading dimensions are flattened into one batch, so that the batch norm
    statistics cover all ``B * H * W`` positions of a map.
    """
    if x.ndim not in (2, 4):
        raise ValueError(
            f"x must have shape (B, H, W, C) or (B, C), got {tuple(x.shape)}."
        )
    out: Tensor = head.layers(x.reshape(-1, x.shape[-1]))
    return out.reshape(*x.shape[:-1], out.shape[-1])


class CoSSLLocalProjectionHead(BYOLProjectionHead):
    """Local projection head g2 of CO-SSL [0]: BYOL's projection MLP per position.

    CO-SSL projects every pre-pooling local feature with a separate head [0]. This
    head is Lightly's :class:`~lightly.models.modules.BYOLProjectionHead` [1]
    applied at every position of a channel-last map: Linear(input_dim,
    hidden_dim) - BatchNorm1d - ReLU - Linear(hidden_dim, output_dim), with the
    batch norm statistics over all positions of the batch (the same as a 1x1
    convolution with BatchNorm2d on a channel-first map). Design decision: the
    local heads take BYOL's dimensions, so that the local and the global branch
    differ only in what they are applied to. The paper names the heads g2_theta
    (online), q2_theta (predictor) and g2_xi (target, EMA).

    - [0]: Aubret et al., Seeing the Whole in the Parts in Self-Supervised
      Representation Learning, 2025, https://arxiv.org/abs/2501.02860
    - [1]: BYOL, 2020, https://arxiv.org/abs/2006.07733

    Examples:
        >>> head = CoSSLLocalProjectionHead(512, 1024, 256)
        >>> feature_map = backbone(images).permute(0, 2, 3, 1)  # (B, 7, 7, 512)
        >>> local_z = head(feature_map)  # (B, 7, 7, 256)
    """

    def __init__(
        self, input_dim: int = 2048, hidden_dim: int = 4096, output_dim: int = 256
    ) -> None:
        """Initializes the CoSSLLocalProjectionHead with the specified dimensions.

        Args:
            input_dim: Width of the local features.
            hidden_dim: Hidden width of the MLP.
            output_dim: Width of the local projections.

        Raises:
            ValueError: If a dimension is not positive.
        """
        _check_dims(input_dim=input_dim, hidden_dim=hidden_dim, output_dim=output_dim)
        super().__init__(
            input_dim=input_dim, hidden_dim=hidden_dim, output_dim=output_dim
        )

    def forward(self, x: Tensor) -> Tensor:
        """Projects every position of a map, or one vector per image.

        Args:
            x: A channel-last feature map, or one vector per image (e.g. the target
                network's global representation). Shape: (B, H, W, input_dim) or
                (B, input_dim).

        Returns:
            The projections. Shape: (B, H, W, output_dim) or (B, output_dim).

        Raises:
            ValueError: If ``x`` is neither 2-D nor 4-D.
        """
        return _position_wise(self, x)


class CoSSLLocalPredictionHead(BYOLPredictionHead):
    """Local prediction head q2 of CO-SSL [0]: BYOL's predictor per position.

    Lightly's :class:`~lightly.models.modules.BYOLPredictionHead` [1] applied at
    every position of a channel-last map: Linear(input_dim, hidden_dim) -
    BatchNorm1d - ReLU - Linear(hidden_dim, output_dim), batch norm statistics
    over all positions of the batch.

    - [0]: Aubret et al., Seeing the Whole in the Parts in Self-Supervised
      Representation Learning, 2025, https://arxiv.org/abs/2501.02860
    - [1]: BYOL, 2020, https://arxiv.org/abs/2006.07733

    Examples:
        >>> head = CoSSLLocalPredictionHead(256, 1024, 256)
        >>> local_p = head(local_z)  # (B, 7, 7, 256) -> (B, 7, 7, 256)
    """

    def __init__(
        self, input_dim: int = 256, hidden_dim: int = 4096, output_dim: int = 256
    ) -> None:
        """Initializes the CoSSLLocalPredictionHead with the specified dimensions.

        Args:
            input_dim: Width of the local projections.
            hidden_dim: Hidden width of the MLP.
            output_dim: Width of the local predictions.

        Raises:
            ValueError: If a dimension is not positive.
        """
        _check_dims(input_dim=input_dim, hidden_dim=hidden_dim, output_dim=output_dim)
        super().__init__(
            input_dim=input_dim, hidden_dim=hidden_dim, output_dim=output_dim
        )

    def forward(self, x: Tensor) -> Tensor:
        """Predicts at every position of a map, or for one vector per image.

        Args:
            x: A channel-last map of local projections, or one vector per image.
                Shape: (B, H, W, input_dim) or (B, input_dim).

        Returns:
            The predictions. Shape: (B, H, W, output_dim) or (B, output_dim).

        Raises:
            ValueError: If ``x`` is neither 2-D nor 4-D.
        """
        return _position_wise(self, x)
