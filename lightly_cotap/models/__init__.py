"""lightly_cotap.models package."""

from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer, CoTAPViTOutput
from lightly_cotap.models.receptive_field import (
    cap_receptive_field,
    resnet_receptive_field,
)

__all__ = [
    "CoTAPVisionTransformer",
    "CoTAPViTOutput",
    "cap_receptive_field",
    "resnet_receptive_field",
]
