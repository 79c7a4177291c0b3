"""lightly-cotap: dense self-supervised learning components for Lightly.

The plugin brings CoTAP [0] (continuous-target AP distillation of patch
correspondences between an image and a semantically similar neighbour, plus an
object-aware filter) and related dense / semantic-pair methods to Lightly users.
The subpackages hold the components: ``loss``, ``models``, ``transforms``,
``data``, ``eval``, ``train`` and (optional, imports mmseg) ``mmseg``.

- [0]: Wen et al., Semantic Concentration for Self-Supervised Dense Representations
  Learning, 2025, https://arxiv.org/abs/2509.09429
"""

from __future__ import annotations

__version__ = "0.1.0"

from lightly_cotap.data import NeighborIndex, SemanticPairDataset
from lightly_cotap.loss import ContinuousAPLoss, CoTAPLoss, CoTAPObjective
from lightly_cotap.models import CoTAPVisionTransformer
from lightly_cotap.transforms import CoTAPTransform

__all__ = [
    "__version__",
    "ContinuousAPLoss",
    "CoTAPLoss",
    "CoTAPObjective",
    "CoTAPTransform",
    "CoTAPVisionTransformer",
    "NeighborIndex",
    "SemanticPairDataset",
]
