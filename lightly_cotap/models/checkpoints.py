"""Checkpoint key mapping: any supported ViT checkpoint onto a CoTAP backbone.

Maps timm, DINO/iBOT, official CoTAP, Lightning and lightly-cotap checkpoints onto a
:class:`~lightly_cotap.models.cotap_vit.CoTAPVisionTransformer`, reporting every
unused or missing key. Position embeddings are resampled with timm's
``resample_abs_pos_embed``. The key mapping stays hand-written: timm's
``checkpoint_filter_fn`` converts one known layout into one timm ViT and drops keys
without saying so, and ``clean_state_dict`` strips only the DDP / ``torch.compile``
prefixes, while this mapper must choose the backbone among student / teacher copies
under any prefix, map the filter keys and account for every key.

Over 400 lines: the mapping, its report and its error belong together.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

#: Key every supported ViT checkpoint contains (after its prefix).
_ANCHOR_KEY = "patch_embed.proj.weight"
#: Prefix of the object-aware filter's keys in the canonical (exported) format.
FILTER_PREFIX = "filter."
_OFFICIAL_FILTER_NORM = re.compile(
    r"^blocks\.(\d+)\.(norm_in|norm_out_patch|norm_out_cls)\.(.+)$"
)


@dataclass
class CheckpointLoadReport:
    """What happened when a checkpoint was loaded into a model.

    Attributes:
        prefix: The key prefix that was stripped from the checkpoint (e.g.
            "teacher.backbone." is reported as the sub-dict name plus prefix).
        loaded_keys: Model keys that received a value from the checkpoint.
        missing_keys: Model keys that the checkpoint did not provide.
        unexpected_keys: Checkpoint keys (canonical names) that the model does not
            know and that are not in ``ignored_keys``.
        ignored_keys: Checkpoint keys that were deliberately not loaded, mapped to the
            reason (e.g. classifier heads, the final norm that CoTAP drops, the
            teacher copy of a student/teacher checkpoint). Keys outside the selected
            backbone are named ``"<sub-dict>:<original key>"`` (e.g.
            ``"state_dict:net_teacher.model.kernel"``), keys inside it by their
            canonical (timm / ``filter.*``) name.
        resampled_keys: Keys whose value was resampled to the model's shape (the
            position embedding for another image size).
        resampled_grids: For each resampled key, the patch grids ``(H, W)`` of the
            checkpoint and of the model.
    """

    prefix: str = ""
    loaded_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    ignored_keys: dict[str, str] = field(default_factory=dict)
    resampled_keys: list[str] = field(default_factory=list)
    resampled_grids: dict[str, tuple[tuple[int, int], tuple[int, int]]] = field(
        default_factory=dict
    )

    def resample_note(self) -> str | None:
        """One line naming the from / to grids of the resampled keys.

        Returns:
            The line, or None if nothing was resampled.
        """
        if not self.resampled_grids:
            return None
        parts = [
            f"{key} resampled from the checkpoint's {old[0]}x{old[1]} patch grid to "
            f"{new[0]}x{new[1]}"
            for key, (old, new) in self.resampled_grids.items()
        ]
        return "; ".join(parts) + " (bicubic, timm's resample_abs_pos_embed)"

    def summary(self) -> str:
        """A human-readable summary of the report.

        Returns:
            Several lines: prefix, counts, missing / unexpected / resampled keys and
            the ignored keys grouped by reason.
        """
        lines = [
            f"prefix: {self.prefix!r}",
            f"loaded: {len(self.loaded_keys)} keys",
            f"missing: {self.missing_keys}",
            f"unexpected: {self.unexpected_keys}",
            f"resampled: {self.resampled_keys}",
            f"ignored: {len(self.ignored_keys)} keys",
        ]
        note = self.resample_note()
        if note is not None:
            lines.insert(5, f"  {note}")
        reasons: dict[str, list[str]] = {}
        for key, reason in self.ignored_keys.items():
            reasons.setdefault(reason, []).append(key)
        for reason, keys in reasons.items():
            shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
            lines.append(f"  {len(keys)} x {reason}: {shown}")
        return "\n".join(lines)


class CheckpointMismatchError(ValueError):
    """Checkpoint weights that do not fit the model (shapes or, strictly, keys)."""


def _unwrap_checkpoint(
    checkpoint: Mapping[str, Any], checkpoint_key: str | None
) -> tuple[Mapping[str, Any], str]:
    """Selects the sub-dict of a checkpoint that holds the weights."""
    if checkpoint_key is not None:
        if checkpoint_key not in checkpoint or not isinstance(
            checkpoint[checkpoint_key], Mapping
        ):
            raise ValueError(
                f"checkpoint_key {checkpoint_key!r} is not a dict in the checkpoint; "
                f"top-level keys: {sorted(checkpoint)[:20]}."
            )
        return checkpoint[checkpoint_key], f"{checkpoint_key}:"
    # Lightning / official CoTAP / lightly-cotap export -> "state_dict";
    # DINO / iBOT training checkpoints -> "teacher" (DINO's default checkpoint_key);
    # DeiT / MAE / timm training -> "model".
    for key in ("state_dict", "teacher", "model", "module"):
        value = checkpoint.get(key)
        if isinstance(value, Mapping) and any(
            isinstance(v, Tensor) for v in value.values()
        ):
            return value, f"{key}:"
    return checkpoint, ""


def _select_prefix(keys: list[str], prefix: str | None) -> str:
    """Finds the prefix in front of the ViT keys (e.g. 'teacher.backbone.')."""
    candidates = sorted(
        {k[: -len(_ANCHOR_KEY)] for k in keys if k.endswith(_ANCHOR_KEY)}
    )
    if prefix is not None:
        if prefix not in candidates:
            raise ValueError(
                f"prefix {prefix!r} does not hold a ViT backbone; candidates found "
                f"(prefixes of '{_ANCHOR_KEY}'): {candidates}."
            )
        return prefix
    if not candidates:
        raise ValueError(
            f"No ViT backbone found in the checkpoint: no key ends with "
            f"'{_ANCHOR_KEY}'. First keys: {keys[:10]}."
        )
    if len(candidates) == 1:
        return candidates[0]
    students = [c for c in candidates if "student" in c]
    non_teacher = [c for c in candidates if "teacher" not in c]
    if len(students) == 1:
        return students[0]
    if len(non_teacher) == 1:
        return non_teacher[0]
    raise ValueError(
        f"The checkpoint holds several ViT backbones with prefixes {candidates}; "
        "pass prefix=... to choose one."
    )


def extract_backbone_state_dict(
    checkpoint: Mapping[str, Any],
    prefix: str | None = None,
    checkpoint_key: str | None = None,
) -> tuple[dict[str, Tensor], dict[str, str], str]:
    """Extracts a canonical backbone state dict from any supported checkpoint.

    The canonical format is the one :func:`lightly_cotap.export.export_backbone`
    writes: plain timm ``VisionTransformer`` keys (``patch_embed.proj.weight``,
    ``blocks.0.attn.qkv.weight``, ...) plus ``filter.*`` keys of the object-aware
    filter. Supported inputs:

    - timm ``state_dict`` and DINO/iBOT backbone weights (same key names as timm);
    - DINO/iBOT training checkpoints (``teacher`` sub-dict by default, keys with
      ``backbone.`` / ``module.`` prefixes);
    - official CoTAP checkpoints (Lightning ``state_dict`` with ``net.model.*``
      student and ``net_teacher.model.*`` teacher keys; ``kernel`` and the last
      block's ``norm_in`` / ``norm_out_*`` become ``filter.*``);
    - lightly-cotap exports and Lightning ``.ckpt`` files whose modules hold a
      :class:`~lightly_cotap.models.cotap_vit.CoTAPVisionTransformer` (e.g.
      ``student_backbone.vit.*`` and ``student_backbone.filter.*``).

    With several backbones (student and teacher) in one dict, the one whose prefix
    contains "student" (or the only one without "teacher") is used, like the
    official CoTAP evaluation; pass ``prefix`` to choose explicitly.

    Args:
        checkpoint: The loaded checkpoint.
        prefix: Key prefix of the backbone inside the (unwrapped) dict, e.g.
            "backbone." or "student_backbone.vit.". Auto-detected if None.
        checkpoint_key: Top-level sub-dict to use (e.g. "student" for a DINO
            checkpoint). Auto-detected if None.

    Returns:
        Tuple ``(state_dict, ignored, used_prefix)``: the canonical state dict, the
        dict of ignored source keys with reasons, and a description of the prefix.

    Raises:
        ValueError: If no (unique) backbone can be found.
    """
    weights, container = _unwrap_checkpoint(checkpoint, checkpoint_key)
    keys = [k for k, v in weights.items() if isinstance(v, Tensor)]
    ignored: dict[str, str] = {
        f"{container}{k}": "not a tensor"
        for k, v in weights.items()
        if not isinstance(v, Tensor)
    }
    if container:
        for k in checkpoint:
            if f"{k}:" != container:
                ignored[k] = f"top-level entry other than {container[:-1]!r}"
    chosen = _select_prefix(keys, prefix)
    # A lightly-cotap model stores the timm ViT under '<root>vit.' and the filter
    # under '<root>filter.'.
    root = chosen[: -len("vit.")] if chosen.endswith("vit.") else None
    # Layout of the official CoTAP ViT: last block index to map the filter norms.
    depth = 1 + max(
        (
            int(m.group(1))
            for k in keys
            if k.startswith(chosen)
            and (m := re.match(r"^blocks\.(\d+)\.", k[len(chosen) :])) is not None
        ),
        default=-1,
    )

    out: dict[str, Tensor] = {}
    for key in keys:
        value = weights[key]
        if root is not None and key.startswith(root + FILTER_PREFIX):
            out[key[len(root) :]] = value
            continue
        if not key.startswith(chosen):
            ignored[f"{container}{key}"] = f"outside the selected backbone {chosen!r}"
            continue
        name = key[len(chosen) :]
        if name == "kernel":  # official CoTAP prototypes
            out[FILTER_PREFIX + "prototypes"] = value
            continue
        match = _OFFICIAL_FILTER_NORM.match(name)
        if match is not None:
            if int(match.group(1)) == depth - 1:
                out[f"{FILTER_PREFIX}{match.group(2)}.{match.group(3)}"] = value
            else:
                ignored[f"{container}{key}"] = (
                    "official CoTAP filter norm of a block without the filter (unused)"
                )
            continue
        out[name] = value
    if (
        FILTER_PREFIX + "prototypes" in out
        and FILTER_PREFIX + "prototypes_initialized" not in out
    ):
        # Prototypes stored in a checkpoint are trained / k-means initialised.
        out[FILTER_PREFIX + "prototypes_initialized"] = torch.tensor(True)
    return out, ignored, f"{container}{chosen}"


def architecture_from_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """The architecture fields that a canonical backbone state dict reveals.

    For checkpoints without ``meta`` (timm / DINO / iBOT weights): the fields of
    :meth:`~lightly_cotap.models.cotap_vit.CoTAPVisionTransformer.get_meta` that
    the tensor shapes determine. ``num_heads`` and ``no_embed_class`` cannot be
    read from shapes, and ``use_filter`` is only reported when the filter keys are
    present (a plain ViT checkpoint also starts a model with a new filter).

    Args:
        state_dict: Output of :func:`extract_backbone_state_dict`.

    Returns:
        A partial meta dict (empty if there is no patch embedding).
    """
    proj = state_dict.get(_ANCHOR_KEY)
    if proj is None or proj.ndim != 4:
        return {}
    width = int(proj.shape[0])
    blocks = {
        int(m.group(1)) for k in state_dict if (m := re.match(r"^blocks\.(\d+)\.", k))
    }
    out: dict[str, Any] = {"embed_dim": width, "patch_size": int(proj.shape[-1])}
    if blocks:
        out["depth"] = max(blocks) + 1
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        out["mlp_ratio"] = float(fc1.shape[0]) / width
    if "blocks.0.attn.qkv.weight" in state_dict:
        out["qkv_bias"] = "blocks.0.attn.qkv.bias" in state_dict
        out["layer_scale"] = "blocks.0.ls1.gamma" in state_dict
    reg = state_dict.get("reg_token")
    out["num_reg_tokens"] = int(reg.shape[1]) if reg is not None else 0
    prototypes = state_dict.get(FILTER_PREFIX + "prototypes")
    if prototypes is not None and prototypes.ndim == 4:
        out["use_filter"] = True
        out["num_prototypes"] = int(prototypes.shape[0])
        out["prototype_size"] = int(prototypes.shape[-1])
    return out


#: Canonical keys that are deliberately not loaded, with the reason.
_IGNORABLE = (
    (re.compile(r"^head(\.|$)|^head_drop\."), "classifier / projection head"),
    (re.compile(r"^projection_heads\."), "official CoTAP projection heads"),
    (re.compile(r"^(masked_embed|mask_token)$"), "iBOT / DINOv2 mask token"),
)


def load_backbone_state_dict(
    model: nn.Module,
    checkpoint: Mapping[str, Any],
    strict: bool = True,
    prefix: str | None = None,
    checkpoint_key: str | None = None,
    resample_pos_embed: bool = True,
) -> CheckpointLoadReport:
    """Loads a checkpoint into a CoTAPVisionTransformer-like model.

    ``model`` must expose the timm ViT as ``model.vit`` and, if it uses the filter,
    the filter as ``model.filter`` (as
    :class:`~lightly_cotap.models.cotap_vit.CoTAPVisionTransformer` does). Nothing is
    dropped silently: every checkpoint key is either loaded, listed in
    ``unexpected_keys`` or listed with a reason in ``ignored_keys``.

    Rules:

    - Shape mismatches always raise, naming every key with both shapes, except for
      the position embedding of a checkpoint trained at another image size, which
      is resampled (bicubic, timm's ``resample_abs_pos_embed``) when
      ``resample_pos_embed`` is True.
    - With ``strict=True``, unexpected keys and missing keys raise. Missing filter
      keys are allowed when the checkpoint has no filter keys at all (the usual
      CoTAP start from a DINO/iBOT backbone: the filter is new).
    - The final ``norm.*`` of a checkpoint is ignored when the model uses the filter
      (CoTAP's ViT has no final norm).

    Args:
        model: The model to load into.
        checkpoint: A loaded checkpoint (see :func:`extract_backbone_state_dict`).
        strict: Raise on missing or unexpected keys.
        prefix: Backbone key prefix; auto-detected if None.
        checkpoint_key: Top-level sub-dict; auto-detected if None.
        resample_pos_embed: Resample a position embedding of another grid size.

    Returns:
        A :class:`CheckpointLoadReport`.

    Raises:
        CheckpointMismatchError: On shape mismatches, or (strict) missing /
            unexpected keys.
    """
    source, ignored, used_prefix = extract_backbone_state_dict(
        checkpoint, prefix=prefix, checkpoint_key=checkpoint_key
    )
    vit = model.vit
    has_filter = getattr(model, "filter", None) is not None
    target = model.state_dict()
    report = CheckpointLoadReport(prefix=used_prefix, ignored_keys=ignored)

    mapped: dict[str, Tensor] = {}
    mismatches: list[str] = []
    for name, value in source.items():
        target_name = name if name.startswith(FILTER_PREFIX) else "vit." + name
        if target_name not in target:
            reason = None
            for pattern, why in _IGNORABLE:
                if pattern.match(name):
                    reason = why
            if reason is None and has_filter and re.match(r"^norm\.", name):
                reason = "final norm (unused with the object-aware filter)"
            if reason is None and re.match(r"^fc_norm\.", name):
                reason = "pooled-feature norm of the classifier"
            if reason is None:
                report.unexpected_keys.append(name)
            else:
                report.ignored_keys[name] = reason
            continue
        expected = target[target_name]
        if value.shape != expected.shape:
            if (
                name == "pos_embed"
                and resample_pos_embed
                and value.ndim == 3
                and value.shape[-1] == expected.shape[-1]
            ):
                resampled = _resample_pos_embed(vit, value, expected)
                if resampled is not None:
                    report.resampled_keys.append(name)
                    report.resampled_grids[name] = resampled[1]
                    mapped[target_name] = resampled[0]
                    continue
            mismatches.append(
                f"{name}: checkpoint shape {tuple(value.shape)} vs model shape "
                f"{tuple(expected.shape)}"
            )
            continue
        mapped[target_name] = value
    if mismatches:
        raise CheckpointMismatchError(
            "Checkpoint does not fit the model architecture (another ViT size, "
            "patch size or number of prototypes?):\n  " + "\n  ".join(mismatches)
        )

    missing = [k for k in target if k not in mapped]
    report.missing_keys = [
        k if k.startswith(FILTER_PREFIX) else k[len("vit.") :] for k in missing
    ]
    report.loaded_keys = sorted(mapped)
    if strict:
        checkpoint_has_filter = any(k.startswith(FILTER_PREFIX) for k in source)
        fatal_missing = [
            k
            for k in report.missing_keys
            if checkpoint_has_filter or not k.startswith(FILTER_PREFIX)
        ]
        if fatal_missing or report.unexpected_keys:
            raise CheckpointMismatchError(
                "Checkpoint keys do not match the model (strict=True):\n"
                f"  missing in checkpoint: {_summarize_keys(fatal_missing)}\n"
                "  unexpected in checkpoint: "
                f"{_summarize_keys(report.unexpected_keys)}\n"
                "Pass strict=False to load the matching keys only (the returned "
                "report lists every key)."
            )
    result = model.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return report


def _summarize_keys(keys: list[str], max_block_keys: int = 3) -> list[str]:
    """Lists keys, collapsing blocks with many keys to 'blocks.N.* (n keys)'."""
    blocks = [re.match(r"^(blocks\.\d+\.)", key) for key in keys]
    counts = Counter(match.group(1) for match in blocks if match is not None)
    out: list[str] = []
    done: set[str] = set()
    for key, match in zip(keys, blocks):
        if match is None or counts[match.group(1)] <= max_block_keys:
            out.append(key)
        elif match.group(1) not in done:
            done.add(match.group(1))
            out.append(f"{match.group(1)}* ({counts[match.group(1)]} keys)")
    return out


def _resample_pos_embed(
    vit: Any, value: Tensor, expected: Tensor
) -> tuple[Tensor, tuple[tuple[int, int], tuple[int, int]]] | None:
    """Resamples a position embedding to the model's grid, or None if impossible.

    Returns:
        The resampled embedding and the ``(old, new)`` patch grids.
    """
    num_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    old_patches = value.shape[1] - num_prefix
    new_patches = expected.shape[1] - num_prefix
    if old_patches <= 0:  # no patch grid at all
        return None
    old_side = math.isqrt(old_patches)
    if old_side * old_side != old_patches:
        return None
    new_size = tuple(vit.patch_embed.grid_size)
    if new_size[0] * new_size[1] != new_patches:
        return None
    resampled: Tensor = resample_abs_pos_embed(
        value,
        new_size=list(new_size),
        old_size=[old_side, old_side],
        num_prefix_tokens=num_prefix,
        verbose=False,
    )
    grids = ((old_side, old_side), (int(new_size[0]), int(new_size[1])))
    return resampled.to(expected.dtype), grids
