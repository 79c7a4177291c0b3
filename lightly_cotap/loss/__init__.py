"""The lightly_cotap.loss package provides dense self-supervised loss functions."""

from lightly_cotap.loss.continuous_ap_loss import ContinuousAPLoss
from lightly_cotap.loss.cotap_loss import CoTAPLoss
from lightly_cotap.loss.cotap_objective import CoTAPObjective, CoTAPViewOutputs
from lightly_cotap.loss.cross_crop_cls_loss import CrossCropClsLoss
from lightly_cotap.loss.cross_image_cls_loss import CrossImageClsLoss
from lightly_cotap.loss.patch_cluster_loss import PatchClusterLoss
from lightly_cotap.loss.prototype_entropy_loss import PrototypeEntropyLoss
from lightly_cotap.loss.sinkhorn_codes import SinkhornCodes

__all__ = [
    "ContinuousAPLoss",
    "CoTAPLoss",
    "CoTAPObjective",
    "CoTAPViewOutputs",
    "CrossCropClsLoss",
    "CrossImageClsLoss",
    "PatchClusterLoss",
    "PrototypeEntropyLoss",
    "SinkhornCodes",
]
