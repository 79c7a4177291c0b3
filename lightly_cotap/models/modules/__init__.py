"""lightly_cotap.models.modules package."""

from lightly_cotap.models.modules.bag_of_patches import (
    BagOfPatchesAggregator,
    aggregate_patch_embeddings,
    grid_patches,
)
from lightly_cotap.models.modules.cossl_heads import (
    CoSSLLocalPredictionHead,
    CoSSLLocalProjectionHead,
)
from lightly_cotap.models.modules.dsa_regulator import (
    DSA_BLOCKS,
    DSARegulator,
    good_neighbor_scores,
    knn_adjacency,
)
from lightly_cotap.models.modules.heads import (
    CoTAPClsProjectionHead,
    CoTAPPatchProjectionHead,
)
from lightly_cotap.models.modules.object_aware_filter import ObjectAwareFilter
from lightly_cotap.models.modules.prototype_bank import PrototypeBank

__all__ = [
    "BagOfPatchesAggregator",
    "aggregate_patch_embeddings",
    "grid_patches",
    "CoSSLLocalPredictionHead",
    "CoSSLLocalProjectionHead",
    "DSA_BLOCKS",
    "DSARegulator",
    "good_neighbor_scores",
    "knn_adjacency",
    "CoTAPClsProjectionHead",
    "CoTAPPatchProjectionHead",
    "ObjectAwareFilter",
    "PrototypeBank",
]
