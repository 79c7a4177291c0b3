"""The lightly_cotap.loss package provides dense self-supervised loss functions."""

from lightly_cotap.loss.continuous_ap_loss import ContinuousAPLoss

__all__ = ["ContinuousAPLoss"]
