"""lightly_cotap.models.modules package."""

from lightly_cotap.models.modules.heads import (
    CoTAPClsProjectionHead,
    CoTAPPatchProjectionHead,
)
from lightly_cotap.models.modules.object_aware_filter import ObjectAwareFilter
from lightly_cotap.models.modules.prototype_bank import PrototypeBank

__all__ = [
    "CoTAPClsProjectionHead",
    "CoTAPPatchProjectionHead",
    "ObjectAwareFilter",
    "PrototypeBank",
]
