"""The ``mmseg`` export format of a CoTAP backbone."""

from __future__ import annotations

import os
from typing import Any

from lightly_cotap.atomic_write import save_torch
from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer

#: Where a :class:`~lightly_cotap.mmseg.backbone.CoTAPViT` keeps the plugin model
#: inside an mmseg segmentor (``EncoderDecoder.backbone.model``).
MMSEG_KEY_PREFIX = "backbone.model."


def mmseg_backbone_cfg(model: CoTAPVisionTransformer) -> dict[str, Any]:
    """The ``model.backbone`` config that builds ``model``'s architecture.

    Args:
        model: The plugin model.

    Returns:
        A config dict for :class:`~lightly_cotap.mmseg.backbone.CoTAPViT`
        (``init_cfg`` not set).
    """
    return dict(
        type="CoTAPViT",
        arch=model.arch,
        use_filter=model.use_filter,
        num_prototypes=model.num_prototypes,
        prototype_size=model.prototype_size,
    )


def mmseg_state_dict(model: CoTAPVisionTransformer) -> dict[str, Any]:
    """Checkpoint dict with the keys of the backbone inside an mmseg segmentor.

    The keys are ``backbone.model.vit.*`` and ``backbone.model.filter.*``, so the
    file works with ``model.backbone.init_cfg=dict(type='Pretrained',
    checkpoint=..., prefix='backbone.')`` (the mmpretrain convention; also
    without the prefix), with mmengine's generic loaders and with ``load_from``.
    ``meta`` is the model's architecture (:meth:`CoTAPVisionTransformer.get_meta`)
    plus ``mmseg_backbone``, the matching backbone config. Only tensors and
    plain Python values: loads with ``torch.load(weights_only=True)``.

    Args:
        model: The backbone to export.

    Returns:
        ``{"meta": ..., "state_dict": ...}`` with CPU tensors.

    Raises:
        TypeError: If ``model`` is not a CoTAPVisionTransformer.
    """
    if not isinstance(model, CoTAPVisionTransformer):
        raise TypeError(
            f"model must be a CoTAPVisionTransformer, got {type(model).__name__}."
        )
    state_dict = {
        MMSEG_KEY_PREFIX + key: value.detach().cpu().clone()
        for key, value in model.state_dict().items()
    }
    meta = dict(model.get_meta())
    meta["export_format"] = "mmseg"
    meta["mmseg_backbone"] = mmseg_backbone_cfg(model)
    return {"meta": meta, "state_dict": state_dict}


def export_mmseg_checkpoint(
    model: CoTAPVisionTransformer, path: str | os.PathLike[str]
) -> None:
    """Writes :func:`mmseg_state_dict` to ``path`` atomically (folders are created).

    Args:
        model: The backbone to export.
        path: Output file.
    """
    save_torch(mmseg_state_dict(model), path)
