"""Export a CoTAP backbone as a plain timm-keyed checkpoint (+ filter weights).

The exported file is ``{"meta": {...}, "state_dict": {...}}``:

- ``state_dict``: the timm ``VisionTransformer`` keys (``patch_embed.proj.weight``,
  ``blocks.0.attn.qkv.weight``, ...) plus the object-aware filter's ``filter.*`` keys
  (``filter.prototypes``, ``filter.norm_in.*``, ``filter.norm_out_patch.*``,
  ``filter.norm_out_cls.*``, ``filter.prototypes_initialized``);
- ``meta``: the architecture (timm name, embed dim, depth, heads, patch size,
  register tokens, filter settings), enough for
  :meth:`~lightly_cotap.models.cotap_vit.CoTAPVisionTransformer.from_checkpoint` /
  :func:`load_backbone` to rebuild the model with no other information.

Command line (``python -m lightly_cotap.export``)::

    python -m lightly_cotap.export --checkpoint run/last.ckpt --output backbone.pth \\
        --arch vit_small_patch16_224

converts any supported checkpoint (lightly-cotap / Lightning / official CoTAP /
DINO / iBOT / timm); the output is written atomically and a bad argument is one line
on stderr with exit code 2 (``--debug`` shows the traceback). ``--arch`` and the
filter options are only needed when the input is not already a lightly-cotap export. ``--format mmseg`` writes the same weights
with the keys of the mmseg backbone (``backbone.model.*``, see
:mod:`lightly_cotap.mmseg`). More output formats can be registered in
:data:`EXPORT_FORMATS`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightly_cotap.atomic_write import save_torch
from lightly_cotap.models.checkpoint_files import load_checkpoint_file
from lightly_cotap.models.checkpoints import extract_backbone_state_dict
from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer, vit_name_problem
from lightly_cotap.user_errors import (
    UsageError,
    add_debug_argument,
    checkpoint_error,
    run_command,
)


def export_state_dict(model: CoTAPVisionTransformer) -> dict[str, Any]:
    """Returns the exported checkpoint dict of a model (see the module docstring).

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
    state_dict: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("vit."):
            key = key[len("vit.") :]
        state_dict[key] = value.detach().cpu().clone()
    return {"meta": model.get_meta(), "state_dict": state_dict}


def export_backbone(
    model: CoTAPVisionTransformer, path: str | os.PathLike[str]
) -> None:
    """Writes a plain timm-keyed checkpoint with the filter keys and the meta dict.

    The file is written atomically (an earlier file is only replaced by a complete
    new one).

    Args:
        model: The backbone to export (e.g. the student of a CoTAP run).
        path: Output file; parent directories are created.
    """
    save_torch(export_state_dict(model), path)


def load_backbone(
    path: str | os.PathLike[str], strict: bool = True
) -> CoTAPVisionTransformer:
    """Loads a checkpoint written by :func:`export_backbone` (in eval mode).

    Args:
        path: The exported file.
        strict: Raise on missing / unexpected keys.

    Returns:
        The rebuilt CoTAPVisionTransformer.
    """
    return CoTAPVisionTransformer.from_checkpoint(path, strict=strict)


def export_mmseg_backbone(
    model: CoTAPVisionTransformer, path: str | os.PathLike[str]
) -> None:
    """Writes the ``mmseg`` format: keys ``backbone.model.*`` of the mmseg backbone.

    See :func:`lightly_cotap.mmseg.checkpoint.mmseg_state_dict`. Needs the ``mmseg``
    extra (imported lazily).

    Args:
        model: The backbone to export.
        path: Output file.
    """
    from lightly_cotap.mmseg.checkpoint import export_mmseg_checkpoint

    export_mmseg_checkpoint(model, path)


#: Output formats of the command line: name -> function(model, output path).
EXPORT_FORMATS: dict[str, Callable[[CoTAPVisionTransformer, Path], None]] = {
    "timm": export_backbone,
    "mmseg": export_mmseg_backbone,
}


def build_model_from_checkpoint(
    checkpoint_path: str | os.PathLike[str],
    arch: str | None = None,
    use_filter: bool | None = None,
    num_prototypes: int | None = None,
    prototype_size: int | None = None,
    prefix: str | None = None,
    checkpoint_key: str | None = None,
    img_size: int | None = None,
    weights_only: bool = True,
) -> CoTAPVisionTransformer:
    """Builds a CoTAPVisionTransformer from any supported checkpoint file.

    A lightly-cotap export (either format) is rebuilt from its ``meta``, and a
    Lightning checkpoint of :class:`~lightly_cotap.train.cotap_module.CoTAPModule`
    from its hyper-parameters (``backbone`` and ``backbone_kwargs``, e.g. a custom
    depth or patch size; the student backbone is loaded). Otherwise ``arch`` (a
    timm name) is required; the filter settings default to what the checkpoint
    holds (filter keys present -> filter with their number / size of prototypes).

    The position embedding keeps the grid it was trained at unless ``img_size``
    asks for another one: an exported model is a faithful copy, and consumers
    (e.g. the mmseg backbone) resample it for their input size and say so.

    Args:
        checkpoint_path: Input checkpoint.
        arch: timm architecture name (needed without ``meta`` or CoTAPModule
            hyper-parameters; overrides the latter).
        use_filter: Build the filter; None = whether the checkpoint has one.
        num_prototypes: None = from the checkpoint (default 64).
        prototype_size: None = from the checkpoint (default 3).
        prefix: Backbone key prefix (auto-detected if None).
        checkpoint_key: Top-level sub-dict (auto-detected if None).
        img_size: Image size of the position-embedding grid of a checkpoint
            without ``meta``; None = the size it was trained at (the CoTAPModule
            hyper-parameters, else the grid of the checkpoint's ``pos_embed``).
            Exports keep their own size.
        weights_only: Use ``torch.load(weights_only=True)``.

    Returns:
        The model with the checkpoint's weights, in eval mode.

    Raises:
        ValueError: If the architecture is unknown or the weights do not fit.
    """
    checkpoint = load_checkpoint_file(checkpoint_path, weights_only=weights_only)
    meta = checkpoint.get("meta")
    if isinstance(meta, Mapping):
        model = CoTAPVisionTransformer.from_meta(meta)
        model.load_pretrained(
            checkpoint, strict=True, prefix=prefix, checkpoint_key=checkpoint_key
        )
        return model.eval()
    backbone_kwargs: dict[str, Any] = {}
    hparams = checkpoint.get("hyper_parameters")
    if (
        arch is None
        and isinstance(hparams, Mapping)
        and isinstance(hparams.get("backbone"), str)
    ):
        arch = hparams["backbone"]
        backbone_kwargs = dict(hparams.get("backbone_kwargs") or {})
    if arch is None:
        raise ValueError(
            f"'{checkpoint_path}' is neither a lightly-cotap export (no 'meta') nor a "
            "CoTAPModule checkpoint; pass the timm architecture name (--arch)."
        )
    state_dict, _, _ = extract_backbone_state_dict(
        checkpoint, prefix=prefix, checkpoint_key=checkpoint_key
    )
    prototypes = state_dict.get("filter.prototypes")
    if use_filter is None:
        use_filter = prototypes is not None
    if prototypes is not None and prototypes.ndim == 4:
        num_prototypes = num_prototypes or int(prototypes.shape[0])
        prototype_size = prototype_size or int(prototypes.shape[-1])
    if img_size is not None:
        backbone_kwargs["img_size"] = img_size

    def build() -> CoTAPVisionTransformer:
        return CoTAPVisionTransformer(
            arch,
            use_filter=use_filter,
            num_prototypes=num_prototypes or 64,
            prototype_size=prototype_size or 3,
            **backbone_kwargs,
        )

    model = build()
    if "img_size" not in backbone_kwargs:
        trained = _trained_img_size(model, state_dict.get("pos_embed"))
        if trained is not None and trained != tuple(model.vit.patch_embed.img_size):
            backbone_kwargs["img_size"] = trained
            model = build()
    report = model.load_pretrained(
        checkpoint, strict=True, prefix=prefix, checkpoint_key=checkpoint_key
    )
    print(report.summary(), file=sys.stderr)
    return model.eval()


def _trained_img_size(
    model: CoTAPVisionTransformer, pos_embed: torch.Tensor | None
) -> tuple[int, int] | None:
    """Image size of a square position-embedding grid, or None if not square."""
    if pos_embed is None or pos_embed.ndim != 3:
        return None
    num_prefix = 0 if model.vit.no_embed_class else model.num_prefix_tokens
    side = math.isqrt(max(int(pos_embed.shape[1]) - num_prefix, 0))
    if side == 0 or side * side != pos_embed.shape[1] - num_prefix:
        return None
    return (side * model.patch_size, side * model.patch_size)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point of ``python -m lightly_cotap.export``.

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Exit code 0 on success.
    """
    parser = argparse.ArgumentParser(
        prog="python -m lightly_cotap.export",
        description="Export a CoTAP backbone checkpoint (no network access).",
    )
    parser.add_argument("--checkpoint", required=True, help="Input checkpoint file.")
    parser.add_argument("--output", required=True, help="Output file.")
    parser.add_argument(
        "--format",
        default="timm",
        choices=sorted(EXPORT_FORMATS),
        help="Output format (default: timm-keyed state_dict + filter keys + meta).",
    )
    parser.add_argument("--arch", default=None, help="timm ViT name (if no meta).")
    filter_group = parser.add_mutually_exclusive_group()
    filter_group.add_argument(
        "--filter", dest="use_filter", action="store_true", default=None
    )
    filter_group.add_argument("--no-filter", dest="use_filter", action="store_false")
    parser.add_argument("--num-prototypes", type=int, default=None)
    parser.add_argument("--prototype-size", type=int, default=None)
    parser.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="Position-embedding grid for checkpoints without meta (default: the "
        "size the checkpoint was trained at).",
    )
    parser.add_argument("--prefix", default=None, help="Backbone key prefix.")
    parser.add_argument("--checkpoint-key", default=None, help="Top-level sub-dict.")
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="torch.load(weights_only=False); only for trusted files.",
    )
    add_debug_argument(parser)
    run_command(_run_export, parser.parse_args(argv), "python -m lightly_cotap.export")
    return 0


def build_model_from_args(
    args: argparse.Namespace, **kwargs: Any
) -> CoTAPVisionTransformer:
    """:func:`build_model_from_checkpoint` for a command line, with user errors.

    Args:
        args: Parsed ``--checkpoint``, ``--arch``, ``--prefix``,
            ``--checkpoint-key`` and ``--unsafe-load``.
        **kwargs: Further arguments of :func:`build_model_from_checkpoint`.

    Returns:
        The model, in eval mode.

    Raises:
        UsageError: If ``--arch`` is no timm ViT or the checkpoint cannot be loaded
            or does not fit.
    """
    if args.arch is not None and (problem := vit_name_problem(args.arch)):
        raise UsageError("--arch", args.arch, problem)
    try:
        return build_model_from_checkpoint(
            args.checkpoint,
            arch=args.arch,
            prefix=args.prefix,
            checkpoint_key=args.checkpoint_key,
            weights_only=not args.unsafe_load,
            **kwargs,
        )
    except (FileNotFoundError, ValueError) as ex:
        raise checkpoint_error(
            "--checkpoint",
            args.checkpoint,
            ex,
            unsafe_fix="pass --unsafe-load",
            mismatch_fix="pass the --arch (timm name) it was trained with",
        ) from ex


def _run_export(args: argparse.Namespace) -> None:
    for option in ("num_prototypes", "prototype_size", "img_size"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UsageError(f"--{option.replace('_', '-')}", value, "must be >= 1")
    if Path(args.output).is_dir():
        raise UsageError("--output", args.output, "is a folder; name the output file")
    model = build_model_from_args(
        args,
        use_filter=args.use_filter,
        num_prototypes=args.num_prototypes,
        prototype_size=args.prototype_size,
        img_size=args.img_size,
    )
    EXPORT_FORMATS[args.format](model, Path(args.output))
    print(f"Wrote {args.format} checkpoint to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
