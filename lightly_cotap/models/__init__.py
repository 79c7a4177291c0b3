"""lightly_cotap.models package."""

from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer, CoTAPViTOutput

__all__ = ["CoTAPVisionTransformer", "CoTAPViTOutput"]
