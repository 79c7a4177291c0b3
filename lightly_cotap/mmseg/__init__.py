"""mmsegmentation adapter (optional; needs the ``mmseg`` extra).

Importing this package, e.g. from an mmseg config with
``custom_imports = dict(imports=['lightly_cotap.mmseg'])``:

1. applies :mod:`lightly_cotap.mmseg.compat` (pure-PyTorch stand-ins for mmcv's
   compiled ops when only ``mmcv-lite`` is installed; nothing with full mmcv);
2. registers in mmseg's registries: the ``CoTAPViT`` backbone, the
   ``COCOStuff27Dataset``, the ``CoTAPLayerDecayOptimWrapperConstructor``, the
   ``FrozenBackboneCheckHook`` and the ``QuietRunner``.

It must be imported before anything imports ``mmcv.ops`` / ``mmseg.models``.
"""

from __future__ import annotations

from lightly_cotap.mmseg import compat

compat.apply()

from lightly_cotap.mmseg.backbone import CoTAPViT  # noqa: E402
from lightly_cotap.mmseg.checkpoint import (  # noqa: E402
    export_mmseg_checkpoint,
    mmseg_backbone_cfg,
    mmseg_in_channels,
    mmseg_state_dict,
)
from lightly_cotap.mmseg.datasets import COCOStuff27Dataset  # noqa: E402
from lightly_cotap.mmseg.engine import (  # noqa: E402
    CoTAPLayerDecayOptimWrapperConstructor,
    FrozenBackboneCheckHook,
)
from lightly_cotap.mmseg.runner import QuietRunner  # noqa: E402

__all__ = [
    "COCOStuff27Dataset",
    "CoTAPLayerDecayOptimWrapperConstructor",
    "CoTAPViT",
    "FrozenBackboneCheckHook",
    "QuietRunner",
    "compat",
    "export_mmseg_checkpoint",
    "mmseg_backbone_cfg",
    "mmseg_in_channels",
    "mmseg_state_dict",
]
