"""The lightly_cotap.loss package provides dense self-supervised loss functions."""

from lightly_cotap.loss.continuous_ap_loss import ContinuousAPLoss
from lightly_cotap.loss.prototype_entropy_loss import PrototypeEntropyLoss

__all__ = ["ContinuousAPLoss", "PrototypeEntropyLoss"]
