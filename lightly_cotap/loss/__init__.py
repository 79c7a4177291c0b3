"""The lightly_cotap.loss package provides dense self-supervised loss functions."""

from lightly_cotap.loss.class_aware_ntx_ent_loss import ClassAwareNTXentLoss
from lightly_cotap.loss.continuous_ap_loss import ContinuousAPLoss
from lightly_cotap.loss.correspondence_criteria import (
    BinaryAPLoss,
    CorrespondenceCriterion,
    HingeContinuousAPLoss,
    SimilarityKLLoss,
    SimilarityMSELoss,
    STEGOCorrelationLoss,
    TopKInfoNCELoss,
)
from lightly_cotap.loss.cossl_loss import CoSSLLoss, CoSSLLossComponents
from lightly_cotap.loss.cotap_loss import CoTAPLoss
from lightly_cotap.loss.cotap_objective import (
    CoTAPObjective,
    CoTAPObjectiveComponents,
    CoTAPViewOutputs,
)
from lightly_cotap.loss.cross_crop_cls_loss import CrossCropClsLoss
from lightly_cotap.loss.cross_image_cls_loss import CrossImageClsLoss
from lightly_cotap.loss.dsa_loss import DSALoss, DSALossComponents
from lightly_cotap.loss.multi_patch_vicreg_loss import MultiPatchVICRegLoss
from lightly_cotap.loss.patch_cluster_loss import PatchClusterLoss
from lightly_cotap.loss.prototype_entropy_loss import PrototypeEntropyLoss
from lightly_cotap.loss.sinkhorn_codes import SinkhornCodes
from lightly_cotap.loss.value_checks import (
    set_value_checks,
    value_checks,
    value_checks_enabled,
)

__all__ = [
    "BinaryAPLoss",
    "CorrespondenceCriterion",
    "HingeContinuousAPLoss",
    "SimilarityKLLoss",
    "SimilarityMSELoss",
    "STEGOCorrelationLoss",
    "TopKInfoNCELoss",
    "DSALoss",
    "DSALossComponents",
    "MultiPatchVICRegLoss",
    "ClassAwareNTXentLoss",
    "CoSSLLoss",
    "CoSSLLossComponents",
    "ContinuousAPLoss",
    "CoTAPLoss",
    "CoTAPObjective",
    "CoTAPObjectiveComponents",
    "CoTAPViewOutputs",
    "CrossCropClsLoss",
    "CrossImageClsLoss",
    "PatchClusterLoss",
    "PrototypeEntropyLoss",
    "SinkhornCodes",
    "set_value_checks",
    "value_checks",
    "value_checks_enabled",
]
