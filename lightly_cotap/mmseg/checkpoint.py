"""The ``mmseg`` export format of a CoTAP backbone."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lightly_cotap.atomic_write import save_torch
from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer
from lightly_cotap.models.cotap_vit_meta import GENERIC_ARCH, timm_overrides

#: Where a :class:`~lightly_cotap.mmseg.backbone.CoTAPViT` keeps the plugin model
#: inside an mmseg segmentor (``EncoderDecoder.backbone.model``).
MMSEG_KEY_PREFIX = "backbone.model."


def mmseg_backbone_cfg(
    model: CoTAPVisionTransformer | Mapping[str, Any],
) -> dict[str, Any]:
    """The ``model.backbone`` config that rebuilds ``model``'s architecture exactly.

    ``arch`` plus the ``timm_kwargs`` that differ from its timm defaults (e.g. the
    demo's ``vit_tiny_patch16_224`` with ``patch_size=8, embed_dim=96, depth=4``),
    ``img_size`` = the size the position embedding was trained at, and the filter
    settings (and ``conv_stem=True`` for a convolutional stem). The widths the heads
    need follow from it: the last level has ``out_dim`` channels (2 x embed_dim
    with the filter), earlier levels ``embed_dim`` (see :func:`mmseg_in_channels`).

    Args:
        model: The plugin model, or its :meth:`CoTAPVisionTransformer.get_meta`
            dict (the ``meta`` of an exported checkpoint).

    Returns:
        A config dict for :class:`~lightly_cotap.mmseg.backbone.CoTAPViT`
        (``init_cfg`` not set).
    """
    meta = model.get_meta() if isinstance(model, CoTAPVisionTransformer) else model
    cfg = dict(
        type="CoTAPViT",
        arch=meta.get("arch") or GENERIC_ARCH,
        img_size=tuple(int(s) for s in meta["img_size"]),
        timm_kwargs=timm_overrides(meta),
        use_filter=bool(meta["use_filter"]),
        num_prototypes=int(meta["num_prototypes"]),
        prototype_size=int(meta["prototype_size"]),
    )
    if meta.get("conv_stem", False):
        cfg["conv_stem"] = True
    return cfg


def mmseg_in_channels(meta: Mapping[str, Any]) -> dict[str, int]:
    """Channels of the backbone's output levels, i.e. the heads' ``in_channels``.

    Args:
        meta: A :meth:`CoTAPVisionTransformer.get_meta` dict.

    Returns:
        ``{"last": out_dim, "intermediate": embed_dim}``: the last level carries
        the filtered features (2 x embed_dim with the filter), the levels of
        earlier blocks the tokens (embed_dim).
    """
    width = int(meta["embed_dim"])
    return {"last": 2 * width if meta["use_filter"] else width, "intermediate": width}


def mmseg_state_dict(model: CoTAPVisionTransformer) -> dict[str, Any]:
    """Checkpoint dict with the keys of the backbone inside an mmseg segmentor.

    The keys are ``backbone.model.vit.*`` and ``backbone.model.filter.*``, so the
    file works with ``model.backbone.init_cfg=dict(type='Pretrained',
    checkpoint=..., prefix='backbone.')`` (the mmpretrain convention; also
    without the prefix), with mmengine's generic loaders and with ``load_from``.
    ``meta`` is the model's architecture (:meth:`CoTAPVisionTransformer.get_meta`)
    plus ``mmseg_backbone``, the backbone config that rebuilds it exactly
    (:func:`mmseg_backbone_cfg`), and ``mmseg_in_channels``, the channels of its
    output levels (:func:`mmseg_in_channels`). Only tensors and plain Python
    values: loads with ``torch.load(weights_only=True)``.

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
    meta["mmseg_backbone"] = mmseg_backbone_cfg(meta)
    meta["mmseg_in_channels"] = mmseg_in_channels(meta)
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
