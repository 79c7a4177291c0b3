"""The ``init_cfg`` checkpoint of the CoTAPViT backbone: reading it and checking it.

Reads local files safely (or URLs through mmengine), applies mmengine's ``prefix``,
and compares the checkpoint's architecture with the configured one so that a
mismatch names each differing field and the config key that fixes it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from mmengine.runner.checkpoint import CheckpointLoader

from lightly_cotap.mmseg.checkpoint import mmseg_backbone_cfg, mmseg_in_channels
from lightly_cotap.models.checkpoint_files import load_checkpoint_file
from lightly_cotap.models.checkpoints import (
    architecture_from_state_dict,
    extract_backbone_state_dict,
)
from lightly_cotap.models.cotap_vit_meta import TIMM_ARGUMENTS, timm_value


def validate_init_cfg(init_cfg: Mapping[str, Any]) -> None:
    """Checks an ``init_cfg`` of the backbone.

    Args:
        init_cfg: ``dict(type='Pretrained', checkpoint=..., prefix=...)``.

    Raises:
        ValueError: If it is of another type, has unknown keys or no path.
    """
    if not isinstance(init_cfg, Mapping) or init_cfg.get("type") != "Pretrained":
        raise ValueError(
            "CoTAPViT supports init_cfg=None or dict(type='Pretrained', "
            f"checkpoint=..., prefix=...), got {init_cfg!r}."
        )
    unknown = set(init_cfg) - {"type", "checkpoint", "prefix", "map_location"}
    if unknown:
        raise ValueError(f"Unknown init_cfg keys for CoTAPViT: {sorted(unknown)}.")
    if not isinstance(init_cfg.get("checkpoint"), (str, os.PathLike)):
        raise ValueError(
            f"init_cfg needs a checkpoint path, got {init_cfg.get('checkpoint')!r}."
        )


def select_mmengine_prefix(
    checkpoint: Mapping[str, Any], prefix: str, path: str
) -> dict[str, Any]:
    """mmengine's ``Pretrained(prefix=...)``: keeps keys with the prefix, strips it.

    Args:
        checkpoint: The loaded checkpoint.
        prefix: Key prefix, with or without the trailing dot.
        path: The file, for the error message.

    Returns:
        ``{"state_dict": selected}`` (plus the checkpoint's ``meta``).

    Raises:
        ValueError: If no key starts with the prefix.
    """
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not prefix.endswith("."):
        prefix += "."
    selected = {
        k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)
    }
    if not selected:
        raise ValueError(f"No key of '{path}' starts with the prefix {prefix!r}.")
    out: dict[str, Any] = {"state_dict": selected}
    if "meta" in checkpoint:
        out["meta"] = checkpoint["meta"]
    return out


def read_checkpoint(path: str) -> dict[str, Any]:
    """Loads a local checkpoint or a URL (mmengine's ``CheckpointLoader``).

    Args:
        path: Local path, or a URL / ``open-mmlab://`` style name.

    Returns:
        The loaded checkpoint.

    Raises:
        FileNotFoundError: If a local file does not exist.
    """
    if "://" in path:
        return dict(CheckpointLoader.load_checkpoint(path, map_location="cpu"))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"CoTAPViT checkpoint not found: '{path}' (set "
            "model.backbone.init_cfg.checkpoint to an exported backbone, "
            "see `python -m lightly_cotap.export --help`)."
        )
    return load_checkpoint_file(path)


def exported_backbone_cfg(path: str) -> dict[str, Any]:
    """The backbone config stored in an export's meta (for ``arch='auto'``).

    Args:
        path: An exported checkpoint.

    Returns:
        The :func:`~lightly_cotap.mmseg.checkpoint.mmseg_backbone_cfg` of its meta.

    Raises:
        ValueError: If the checkpoint has no export meta.
    """
    meta = read_checkpoint(path).get("meta")
    if not isinstance(meta, Mapping) or "embed_dim" not in meta:
        raise ValueError(
            f"CoTAPViT(arch='auto') needs an exported checkpoint (with 'meta'), but "
            f"'{path}' has none. Export it with `python -m lightly_cotap.export "
            "--format mmseg --checkpoint IN --output OUT`, or set model.backbone.arch "
            "to a timm name (plus timm_kwargs)."
        )
    return mmseg_backbone_cfg(meta)


def _config_setting(field: str, value: Any) -> str:
    """``key=value`` of the config that gives a meta field this value."""
    if field in TIMM_ARGUMENTS:
        timm_arg = TIMM_ARGUMENTS[field]
        return f"model.backbone.timm_kwargs.{timm_arg}={timm_value(field, value)!r}"
    return f"model.backbone.{field}={value!r}"


def check_architecture(
    checkpoint: Mapping[str, Any], path: str, mine: Mapping[str, Any], description: str
) -> None:
    """Compares a checkpoint's architecture with the backbone's configuration.

    Exports are compared field by field with their ``meta``; other checkpoints with
    what their tensor shapes reveal.

    Args:
        checkpoint: The loaded checkpoint.
        path: The file, for the message.
        mine: The backbone model's
            :meth:`~lightly_cotap.models.cotap_vit.CoTAPVisionTransformer.get_meta`.
        description: The backbone's configuration, for the message.

    Raises:
        ValueError: Naming each differing field and the config key to set.
    """
    meta = checkpoint.get("meta")
    exported = isinstance(meta, Mapping) and "embed_dim" in meta
    if isinstance(meta, Mapping) and exported:
        theirs = dict(meta)
    else:
        try:
            state_dict, _, _ = extract_backbone_state_dict(checkpoint)
        except ValueError:
            return  # the loader raises with the details
        theirs = architecture_from_state_dict(state_dict)
    fields = [*TIMM_ARGUMENTS, "use_filter"]
    if mine["use_filter"] and theirs.get("use_filter", True):
        fields += ["num_prototypes", "prototype_size"]
    diff = [f for f in fields if f in theirs and theirs[f] != mine[f]]
    if not diff:
        return
    lines = [
        f"  {f}: checkpoint {theirs[f]!r}, config {mine[f]!r} -> set "
        + _config_setting(f, theirs[f])
        for f in diff
    ]
    if exported:
        channels = mmseg_in_channels(theirs)
        lines.append(
            "Set these keys, or model.backbone.arch='auto' to take the whole "
            "architecture from the checkpoint. The decode head on the last level "
            f"then needs in_channels={channels['last']}; heads and necks on "
            f"earlier levels {channels['intermediate']}."
        )
    else:
        lines.append("Set these keys.")
    raise ValueError(
        f"Checkpoint '{path}' holds another architecture than the backbone "
        f"configured as {description}:\n" + "\n".join(lines)
    )
