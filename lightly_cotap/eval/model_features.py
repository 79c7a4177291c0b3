"""The point where the plugin's model enters the dense evaluation: every caller that
evaluates the plugin's model goes through :func:`dense_feature_fn`.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightly_cotap.eval.features import FeatureFn


def dense_feature_fn(model: nn.Module) -> FeatureFn:
    """Returns the feature function of a model with a ``dense`` output for eval.

    Args:
        model: A :class:`~lightly_cotap.models.CoTAPVisionTransformer` (or any
            module whose output has a channel-last ``dense`` attribute).

    Returns:
        A function mapping images (B, 3, H, W) to the model's dense features,
        channel-last (B, h, w, D).

    Examples:
        >>> report = evaluate_dense(dense_feature_fn(model), train_set, val_set, 21,
        ...                         module=model)
    """

    def features(images: Tensor) -> Tensor:
        dense: Tensor = model(images).dense  # (B, h, w, D)
        return dense

    return features
