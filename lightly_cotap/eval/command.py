"""The ``lightly-cotap eval`` command: dense evaluation of a checkpoint on a folder.

Usage::

    lightly-cotap eval --checkpoint backbone.pth \\
        --images scenes/train/images --masks scenes/train/masks \\
        --val-images scenes/test/images --val-masks scenes/test/masks --out eval/

loads the backbone (a ``lightly_cotap.export`` file, a Lightning / training
checkpoint or a plain timm / DINO state dict, through the project's one checkpoint
mapper :func:`lightly_cotap.export.build_model_from_checkpoint`; pass ``--arch`` when
the checkpoint has neither ``meta`` nor CoTAPModule hyper-parameters), runs :func:`lightly_cotap.eval.evaluate_dense` (linear
probe, k-means, overclustering, retrieval), prints a table and writes
``OUT/report.json`` plus ``OUT/pca.png`` and ``OUT/similarity.png``.

Without ``--val-images`` / ``--val-masks`` a seeded ``--val-fraction`` of the
``--images`` folder is held out for validation. Every input (folders, stems, mask
values, checkpoint) is checked before the backbone runs, so a bad argument fails in
seconds with a message naming it; the report is written atomically (an earlier
``report.json`` is only replaced by a complete new one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset

#: Evaluations that ``--skip`` accepts (keys of the report).
EVALUATIONS = ("linear_probe", "kmeans", "overclustering", "retrieval")


class EvalCommandError(ValueError):
    """A user error of the ``eval`` command (bad folder, checkpoint or option).

    The command line prints its message and exits with code 2 (no traceback); any
    other exception propagates unchanged.
    """


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the options of ``lightly-cotap eval`` to a parser.

    Args:
        parser: The (sub-)parser of the command.

    Returns:
        The same parser.
    """
    ckpt = parser.add_argument_group("checkpoint")
    ckpt.add_argument(
        "--checkpoint",
        required=True,
        help="lightly-cotap export (timm or mmseg format), Lightning/training "
        "checkpoint or timm/DINO state dict.",
    )
    ckpt.add_argument(
        "--arch",
        default=None,
        help="timm ViT name (e.g. vit_small_patch16_224), needed when the checkpoint "
        "has neither lightly-cotap 'meta' nor CoTAPModule hyper-parameters.",
    )
    ckpt.add_argument("--prefix", default=None, help="Backbone key prefix.")
    ckpt.add_argument("--checkpoint-key", default=None, help="Top-level sub-dict.")
    ckpt.add_argument(
        "--unsafe-load",
        action="store_true",
        help="torch.load(weights_only=False); only for trusted files.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--images", required=True, help="Folder of training images.")
    data.add_argument(
        "--masks", required=True, help="Folder of training masks (same file stems)."
    )
    data.add_argument("--val-images", default=None, help="Folder of val images.")
    data.add_argument("--val-masks", default=None, help="Folder of val masks.")
    data.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="Without --val-images: fraction of --images held out (default: 0.3).",
    )
    data.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="Number of classes incl. background (default: 1 + largest mask value).",
    )
    data.add_argument(
        "--ignore-index", type=int, default=255, help="Mask value that is not scored."
    )
    data.add_argument(
        "--image-size", type=int, default=224, help="Images are resized to this."
    )
    data.add_argument(
        "--label-size",
        type=int,
        default=100,
        help="Resolution of the scored label maps (0: the image size).",
    )
    evals = parser.add_argument_group("evaluation")
    evals.add_argument(
        "--probe-steps", type=int, default=500, help="Adam steps of the linear probe."
    )
    evals.add_argument(
        "--probe-lr", type=float, default=3e-3, help="Learning rate of the probe."
    )
    evals.add_argument(
        "--probe-head",
        choices=("bn", "plain"),
        default="bn",
        help="Linear probe head: BatchNorm + 1x1 conv (bn) or a plain 1x1 conv.",
    )
    evals.add_argument(
        "--overclustering-k",
        type=int,
        default=None,
        help="k-means K of the overclustering (default: 4 * classes).",
    )
    evals.add_argument(
        "--retrieval-k", type=int, default=30, help="Neighbours per retrieved patch."
    )
    evals.add_argument(
        "--memory-size",
        type=int,
        default=None,
        help="Patches in the retrieval memory (default: all training patches).",
    )
    evals.add_argument(
        "--absent-classes",
        choices=("zero", "exclude"),
        default="zero",
        help="A class absent from labels and prediction scores 0 (zero) or is left "
        "out of the mean (exclude, as mmseg).",
    )
    evals.add_argument(
        "--skip",
        action="append",
        choices=EVALUATIONS,
        default=[],
        help="Evaluation to skip (repeatable).",
    )
    evals.add_argument(
        "--num-visualize",
        type=int,
        default=8,
        help="Validation images in pca.png / similarity.png (0: no images).",
    )
    evals.add_argument(
        "--batch-size", type=int, default=32, help="Images per forward pass."
    )
    evals.add_argument("--device", default="cpu", help="Torch device.")
    evals.add_argument("--seed", type=int, default=0, help="Seed of every evaluation.")
    evals.add_argument("--out", default="outputs/eval", help="Output folder.")
    evals.add_argument(
        "--no-progress",
        action="store_true",
        help="No progress bars; one progress line every 30 s instead (for logs).",
    )
    return parser


def _check_folder(path: str, option: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise EvalCommandError(f"{option} {path!r} is not a folder.")
    return folder


def _segmentation_folder(
    images: str, masks: str, image_size: int, image_option: str, mask_option: str
) -> Any:
    from lightly_cotap.data.segmentation_folder import SegmentationFolder

    _check_folder(images, image_option)
    _check_folder(masks, mask_option)
    try:
        return SegmentationFolder(images, masks, image_size=image_size)
    except ValueError as ex:
        raise EvalCommandError(f"{image_option} / {mask_option}: {ex}") from ex


def _mask_values(paths: Sequence[Path], option: str) -> set[int]:
    values: set[int] = set()
    for path in paths:
        with Image.open(path) as mask:
            if mask.mode not in ("L", "P", "I", "I;16"):
                raise EvalCommandError(
                    f"{option}: mask {str(path)!r} is a {mask.mode} image; masks must "
                    "be single-channel images of class ids (or palette PNGs)."
                )
            values.update(int(v) for v in np.unique(np.asarray(mask)))
    return values


def _class_names(masks: str, num_classes: int) -> list[str] | None:
    """Names from a ``classes.json`` next to the mask folder (CopyPasteScenes.save)."""
    meta_path = Path(masks).parent / "classes.json"
    try:
        names = json.loads(meta_path.read_text())["class_names"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(names, list) and len(names) == num_classes:
        return [str(n) for n in names]
    return None


def _split(
    dataset: Dataset[tuple[Tensor, Tensor]], fraction: float, seed: int
) -> tuple[Subset[tuple[Tensor, Tensor]], Subset[tuple[Tensor, Tensor]]]:
    n = len(dataset)  # type: ignore[arg-type]
    num_val = int(round(fraction * n))
    if num_val < 1 or num_val > n - 1:
        raise EvalCommandError(
            f"--val-fraction {fraction} of {n} images leaves no training or no "
            "validation image; pass more images or --val-images / --val-masks."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(order[num_val:])), Subset(
        dataset, sorted(order[:num_val])
    )


def _load_model(args: argparse.Namespace) -> Any:
    from lightly_cotap.export import build_model_from_checkpoint

    path = Path(args.checkpoint)
    if not path.is_file():
        raise EvalCommandError(f"--checkpoint {args.checkpoint!r} is not a file.")
    try:
        model = build_model_from_checkpoint(
            path,
            arch=args.arch,
            prefix=args.prefix,
            checkpoint_key=args.checkpoint_key,
            img_size=args.image_size,
            weights_only=not args.unsafe_load,
        )
    except ValueError as ex:
        hint = (
            "\n(a trusted checkpoint with pickled objects loads with --unsafe-load)"
            if "weights_only" in str(ex) and not args.unsafe_load
            else ""
        )
        raise EvalCommandError(
            f"cannot load --checkpoint {args.checkpoint!r}: {ex}{hint}"
        ) from ex
    except (KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as ex:
        # What torch.load raises for files that are no torch checkpoint at all.
        raise EvalCommandError(
            f"--checkpoint {args.checkpoint!r} is not a readable PyTorch checkpoint "
            f"({type(ex).__name__}: {ex})."
        ) from ex
    if args.image_size % model.patch_size != 0:
        raise EvalCommandError(
            f"--image-size {args.image_size} is not divisible by the patch size "
            f"{model.patch_size} of the checkpoint."
        )
    return model.to(args.device).eval()


def format_report(report: dict[str, Any]) -> str:
    """Formats the metrics of an evaluation report as a Markdown table.

    Args:
        report: The dict returned by :func:`run_eval`.

    Returns:
        A table with one row per evaluation (mIoU and pixel accuracy in percent), then
        the per-class IoU of every evaluation.
    """
    names = [n for n in EVALUATIONS if n in report]
    lines = [
        "| evaluation | mIoU (%) | pixel acc. (%) | seconds |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        r = report[name]
        lines.append(
            f"| {name} | {100 * r['miou']:.2f} | {100 * r['pixel_accuracy']:.2f} | "
            f"{r.get('seconds', float('nan')):.1f} |"
        )
    class_names = report.get("settings", {}).get("class_names")
    if names:
        num = len(report[names[0]]["iou_per_class"])
        labels = class_names or [str(c) for c in range(num)]
        lines += ["", "| class | " + " | ".join(names) + " |"]
        lines.append("|---|" + "---:|" * len(names))
        for c in range(num):
            cells = []
            for name in names:
                v = report[name]["iou_per_class"][c]
                cells.append(
                    "-" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"
                )
            lines.append(f"| {labels[c]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Runs ``lightly-cotap eval`` with parsed arguments.

    Args:
        args: Namespace of a parser set up by :func:`add_eval_arguments`.

    Returns:
        The report that was written to ``OUT/report.json`` (metrics of every
        evaluation, ``settings`` and ``checkpoint``).

    Raises:
        EvalCommandError: If a folder, the checkpoint or an option is invalid
            (checked before any feature is computed).
    """
    from lightly_cotap.eval.dense import evaluate_dense
    from lightly_cotap.eval.progress import Progress

    if args.image_size <= 0 or args.label_size < 0 or args.batch_size <= 0:
        raise EvalCommandError(
            "--image-size and --batch-size must be positive and --label-size >= 0, "
            f"got {args.image_size}, {args.batch_size} and {args.label_size}."
        )
    if (args.val_images is None) != (args.val_masks is None):
        raise EvalCommandError("pass both --val-images and --val-masks, or neither.")
    if args.val_images is not None and args.val_fraction is not None:
        raise EvalCommandError(
            "--val-fraction cannot be combined with --val-images / --val-masks."
        )
    fraction = 0.3 if args.val_fraction is None else args.val_fraction
    if args.val_images is None and not 0 < fraction < 1:
        raise EvalCommandError(f"--val-fraction must lie in (0, 1), got {fraction}.")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EvalCommandError(f"--out {args.out!r} exists and is not a folder.")

    train_folder = _segmentation_folder(
        args.images, args.masks, args.image_size, "--images", "--masks"
    )
    labels = _mask_values([m for _, m in train_folder.samples], "--masks")
    if args.val_images is not None:
        val_folder = _segmentation_folder(
            args.val_images,
            args.val_masks,
            args.image_size,
            "--val-images",
            "--val-masks",
        )
        labels |= _mask_values([m for _, m in val_folder.samples], "--val-masks")
        train_set: Any = train_folder
        val_set: Any = val_folder
    else:
        train_set, val_set = _split(train_folder, fraction, args.seed)
    labels -= {args.ignore_index}
    if not labels:
        raise EvalCommandError("every mask pixel equals --ignore-index.")
    num_classes = args.num_classes
    if num_classes is None:
        num_classes = max(max(labels) + 1, 2)
    elif max(labels) >= num_classes or min(labels) < 0:
        raise EvalCommandError(
            f"the masks hold labels {sorted(labels)} but --num-classes is "
            f"{num_classes} (labels must lie in [0, {num_classes}) or equal "
            f"--ignore-index {args.ignore_index})."
        )
    if num_classes < 2:
        raise EvalCommandError(f"--num-classes must be at least 2, got {num_classes}.")

    model = _load_model(args)
    over_k = args.overclustering_k
    if over_k is None:
        # 4 * C as in evaluate_dense, but at most the number of validation patches.
        grid = args.image_size // model.patch_size
        over_k = min(4 * num_classes, len(val_set) * grid * grid)
    progress: Progress = "lines" if args.no_progress else True
    skip = set(args.skip)
    report = evaluate_dense(
        lambda x: model(x).dense,
        train_set,
        val_set,
        num_classes,
        label_size=args.label_size or None,
        batch_size=args.batch_size,
        device=args.device,
        module=model,
        ignore_index=args.ignore_index,
        absent_classes=args.absent_classes,
        seed=args.seed,
        linear_probe={
            "steps": args.probe_steps,
            "lr": args.probe_lr,
            "use_bn": args.probe_head == "bn",
            "skip": "linear_probe" in skip,
        },
        kmeans={"skip": "kmeans" in skip},
        overclustering_k=0 if "overclustering" in skip else over_k,
        retrieval={
            "k": args.retrieval_k,
            "memory_size": args.memory_size,
            "skip": "retrieval" in skip,
        },
        visualize_dir=out if args.num_visualize > 0 else None,
        num_visualize=args.num_visualize,
        progress=progress,
    )
    report["settings"].update(
        class_names=_class_names(args.masks, num_classes),
        image_size=args.image_size,
        val_source=(
            "folders" if args.val_images is not None else f"fraction {fraction}"
        ),
    )
    report["checkpoint"] = {
        "path": str(Path(args.checkpoint).resolve()),
        "arch": model.arch,
        "use_filter": model.use_filter,
        "out_dim": model.out_dim,
        "patch_size": model.patch_size,
    }
    report = dict(_jsonable(report))
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".report.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False))
    tmp.replace(out / "report.json")
    print(format_report(report))
    print(f"Wrote {out / 'report.json'}", file=sys.stderr)
    return report


def run_eval_command(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`run_eval` for the command line: user errors exit with code 2.

    Args:
        args: Parsed arguments (see :func:`add_eval_arguments`).

    Returns:
        The report.

    Raises:
        SystemExit: With code 2 and ``lightly-cotap eval: error: ...`` on stderr for
            an :class:`EvalCommandError`.
    """
    try:
        return run_eval(args)
    except EvalCommandError as ex:
        sys.stderr.write(f"lightly-cotap eval: error: {ex}\n")
        raise SystemExit(2) from ex


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command on its own (``python -m lightly_cotap.eval.command``).

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Exit code: 0 on success, 2 on a user error (message on stderr).
    """
    from lightly_cotap.cli import HelpFormatter

    parser = add_eval_arguments(
        argparse.ArgumentParser(
            prog="lightly-cotap eval",
            description="Dense evaluation of a checkpoint.",
            formatter_class=HelpFormatter,
        )
    )
    run_eval_command(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
