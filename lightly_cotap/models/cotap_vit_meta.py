"""The architecture description (``meta``) stored with exported CoTAP backbones.

A ``meta`` dict holds primitive values only: the timm name, the structure of the
ViT and the object-aware filter settings. It is what
:meth:`~lightly_cotap.models.cotap_vit.CoTAPVisionTransformer.from_meta` rebuilds a
model from, and what the mmseg backbone compares a checkpoint's architecture with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import timm
import torch
from timm.layers import LayerScale

#: Version of the ``meta`` dict written by
#: :meth:`~lightly_cotap.models.cotap_vit.CoTAPVisionTransformer.get_meta`.
META_FORMAT_VERSION = 1

#: The ``timm.create_model`` argument that sets each structural field of the meta
#: dict (``layer_scale`` is set through ``init_values``).
TIMM_ARGUMENTS: dict[str, str] = {
    "patch_size": "patch_size",
    "embed_dim": "embed_dim",
    "depth": "depth",
    "num_heads": "num_heads",
    "mlp_ratio": "mlp_ratio",
    "qkv_bias": "qkv_bias",
    "num_reg_tokens": "reg_tokens",
    "no_embed_class": "no_embed_class",
    "layer_scale": "init_values",
}

#: timm name whose defaults are those of timm's plain ``VisionTransformer``; stands
#: in for a meta dict without a model name.
GENERIC_ARCH = "vit_base_patch16_224"

#: Fields that every meta dict must hold.
REQUIRED_FIELDS = (
    "format_version",
    "img_size",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "num_reg_tokens",
    "no_embed_class",
    "layer_scale",
    "use_filter",
    "num_prototypes",
    "prototype_size",
)


def vit_structure(vit: Any) -> dict[str, Any]:
    """The structural meta fields of a timm ``VisionTransformer``.

    Args:
        vit: The timm ViT.

    Returns:
        ``img_size`` (the position-embedding grid times the patch size) and the
        fields of :data:`TIMM_ARGUMENTS`.
    """
    block = vit.blocks[0]
    attn = block.attn
    embed_dim = int(vit.embed_dim)
    return {
        "img_size": [int(s) for s in vit.patch_embed.img_size],
        "patch_size": int(vit.patch_embed.patch_size[0]),
        "embed_dim": embed_dim,
        "depth": len(vit.blocks),
        "num_heads": int(attn.num_heads),
        "mlp_ratio": float(block.mlp.fc1.out_features) / embed_dim,
        "qkv_bias": attn.qkv.bias is not None,
        "num_reg_tokens": int(vit.num_reg_tokens),
        "no_embed_class": bool(vit.no_embed_class),
        "layer_scale": isinstance(block.ls1, LayerScale),
    }


def check_meta(meta: Mapping[str, Any]) -> None:
    """Checks that a meta dict is complete and of a known version.

    Args:
        meta: The architecture description.

    Raises:
        ValueError: If a field is missing or the version is newer than supported.
    """
    missing = [k for k in REQUIRED_FIELDS if k not in meta]
    if missing:
        raise ValueError(f"Checkpoint meta lacks {missing}.")
    if int(meta["format_version"]) > META_FORMAT_VERSION:
        raise ValueError(
            f"Checkpoint meta format_version {meta['format_version']} is newer "
            f"than this lightly-cotap version supports ({META_FORMAT_VERSION})."
        )


def timm_value(field: str, value: Any) -> Any:
    """The ``timm.create_model`` value of a structural meta field.

    Args:
        field: A key of :data:`TIMM_ARGUMENTS`.
        value: Its value in the meta dict.

    Returns:
        The value of the timm argument ``TIMM_ARGUMENTS[field]``.
    """
    if field == "layer_scale":
        return 1e-5 if value else None
    return value


def timm_overrides(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments of ``timm.create_model`` that rebuild the meta's ViT from its name.

    ``CoTAPVisionTransformer(meta["arch"], **timm_overrides(meta))`` (or, in mmseg,
    ``CoTAPViT(arch=..., timm_kwargs=...)``) rebuilds the exported ViT, e.g. the
    demo's ``vit_tiny_patch16_224`` with ``patch_size=8, embed_dim=96, depth=4``.
    Only the fields that differ from the name's defaults are returned. A meta dict
    without a name stands for a plain timm ``VisionTransformer``, whose defaults
    are those of :data:`GENERIC_ARCH`.

    Args:
        meta: A :meth:`~lightly_cotap.models.cotap_vit.CoTAPVisionTransformer.get_meta`
            dict.

    Returns:
        timm argument name -> value.

    Raises:
        ValueError: If a structural field is missing.
    """
    missing = [f for f in TIMM_ARGUMENTS if f not in meta]
    if missing:
        raise ValueError(f"Checkpoint meta lacks {missing}.")
    with torch.device("meta"):  # no memory, no initialisation cost
        default = vit_structure(
            timm.create_model(
                meta.get("arch") or GENERIC_ARCH, pretrained=False, num_classes=0
            )
        )
    return {
        TIMM_ARGUMENTS[f]: timm_value(f, meta[f])
        for f in TIMM_ARGUMENTS
        if meta[f] != default[f]
    }
