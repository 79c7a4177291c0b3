"""Local (1x1-convolution) projection and prediction heads of CO-SSL."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class _ConvProjectionHead(nn.Module):
    """A projection head made of 1x1 convolutions, applied at every position.

    The 1x1-convolution counterpart of Lightly's ``ProjectionHead``: built from
    blocks ``(in_channels, out_channels, batch_norm | None, non_linearity | None)``;
    a convolution has no bias when it is followed by batch norm.
    """

    def __init__(
        self, blocks: Sequence[tuple[int, int, nn.Module | None, nn.Module | None]]
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for in_channels, out_channels, batch_norm, non_linearity in blocks:
            if in_channels < 1 or out_channels < 1:
                raise ValueError(
                    "Head dimensions must be positive, got "
                    f"({in_channels}, {out_channels})."
                )
            layers.append(
                nn.Conv2d(
                    in_channels,
                    out_channels,
                    kernel_size=1,
                    bias=batch_norm is None,
                )
            )
            if batch_norm is not None:
                layers.append(batch_norm)
            if non_linearity is not None:
                layers.append(non_linearity)
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Applies the head at every spatial position.

        Args:
            x:
                A feature map, or one vector per image (handled as a 1x1 map, e.g.
                for the target network's global representation).
                Shape: (B, C, H, W) or (B, C)

        Returns:
            The projected map or vectors. Shape: (B, D, H, W) or (B, D)

        Raises:
            ValueError: If ``x`` is neither 2-D nor 4-D.
        """
        if x.ndim == 2:
            out: Tensor = self.layers(x[:, :, None, None])
            return out.flatten(1)
        if x.ndim != 4:
            raise ValueError(
                f"Expected input of shape (B, C, H, W) or (B, C), got {tuple(x.shape)}."
            )
        out = self.layers(x)
        return out


class CoSSLLocalProjectionHead(_ConvProjectionHead):
    """Local projection head g2 of CO-SSL [0]: BYOL's projection MLP as 1x1 convs.

    CO-SSL projects every pre-pooling local feature with a separate head made of
    1x1 convolutions [0]. This head mirrors
    :class:`~lightly.models.modules.BYOLProjectionHead` [1] position-wise:
    Conv1x1(input_dim, hidden_dim) - BatchNorm2d - ReLU - Conv1x1(hidden_dim,
    output_dim). The dimensions are inferred (no official code); the paper names
    the heads g2_theta (online), q2_theta (predictor) and g2_xi (target, EMA).

    - [0]: Aubret et al., Seeing the Whole in the Parts in Self-Supervised
      Representation Learning, 2025, https://arxiv.org/abs/2501.02860
    - [1]: BYOL, 2020, https://arxiv.org/abs/2006.07733

    Examples:
        >>> head = CoSSLLocalProjectionHead(512, 1024, 256)
        >>> feature_map = backbone(images)  # (B, 512, 7, 7)
        >>> local_z = head(feature_map)  # (B, 256, 7, 7)
    """

    def __init__(
        self, input_dim: int = 2048, hidden_dim: int = 4096, output_dim: int = 256
    ) -> None:
        """Initializes the head with the specified dimensions.

        Raises:
            ValueError: If a dimension is not positive.
        """
        super().__init__(
            [
                (input_dim, hidden_dim, nn.BatchNorm2d(max(hidden_dim, 1)), nn.ReLU()),
                (hidden_dim, output_dim, None, None),
            ]
        )


class CoSSLLocalPredictionHead(_ConvProjectionHead):
    """Local prediction head q2 of CO-SSL [0]: BYOL's predictor as 1x1 convs.

    Mirrors :class:`~lightly.models.modules.BYOLPredictionHead` [1] position-wise:
    Conv1x1(input_dim, hidden_dim) - BatchNorm2d - ReLU - Conv1x1(hidden_dim,
    output_dim).

    - [0]: Aubret et al., Seeing the Whole in the Parts in Self-Supervised
      Representation Learning, 2025, https://arxiv.org/abs/2501.02860
    - [1]: BYOL, 2020, https://arxiv.org/abs/2006.07733
    """

    def __init__(
        self, input_dim: int = 256, hidden_dim: int = 4096, output_dim: int = 256
    ) -> None:
        """Initializes the head with the specified dimensions.

        Raises:
            ValueError: If a dimension is not positive.
        """
        super().__init__(
            [
                (input_dim, hidden_dim, nn.BatchNorm2d(max(hidden_dim, 1)), nn.ReLU()),
                (hidden_dim, output_dim, None, None),
            ]
        )
