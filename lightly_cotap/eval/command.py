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
seconds with a one-line message naming it (exit code 2, see
:mod:`lightly_cotap.user_errors`). The number of classes is never guessed from stray
mask values (see :mod:`lightly_cotap.eval.mask_labels`). The report is written
atomically (an earlier ``report.json`` is only replaced by a complete new one).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from lightly_cotap.atomic_write import write_json
from lightly_cotap.cli import HelpFormatter
from lightly_cotap.data.segmentation_folder import SegmentationFolder
from lightly_cotap.eval.dense import evaluate_dense
from lightly_cotap.eval.mask_labels import class_names_file, decide_classes, scan_masks
from lightly_cotap.eval.model_features import dense_feature_fn
from lightly_cotap.eval.progress import Progress
from lightly_cotap.eval.report import EVALUATIONS, format_report, jsonable
from lightly_cotap.export import build_model_from_args
from lightly_cotap.user_errors import UsageError, add_debug_argument, run_command


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
        help="Number of classes incl. background (default: from a classes.json next "
        "to the mask folder, else 1 + largest mask value if the labels are 0..N).",
    )
    data.add_argument(
        "--ignore-index",
        type=int,
        default=None,
        help="Mask value of ignored pixels (default 255; masks of only 0 and 255 are "
        "then read as binary foreground masks).",
    )
    data.add_argument(
        "--ignore-unknown-labels",
        action="store_true",
        help="Ignore mask labels outside the declared classes (counted) instead of "
        "refusing them.",
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
        raise UsageError(option, path, "is not a folder")
    return folder


def _segmentation_folder(
    images: str, masks: str, image_size: int, image_option: str, mask_option: str
) -> Any:
    _check_folder(images, image_option)
    _check_folder(masks, mask_option)
    try:
        return SegmentationFolder(images, masks, image_size=image_size)
    except ValueError as ex:
        raise UsageError(
            f"{image_option} / {mask_option}", f"{images} / {masks}", str(ex)
        ) from ex


def _split(
    dataset: Dataset[tuple[Tensor, Tensor]], fraction: float, seed: int
) -> tuple[Subset[tuple[Tensor, Tensor]], Subset[tuple[Tensor, Tensor]]]:
    n = len(dataset)  # type: ignore[arg-type]
    num_val = int(round(fraction * n))
    if num_val < 1 or num_val > n - 1:
        raise UsageError(
            "--val-fraction",
            fraction,
            f"leaves no training or no validation image of {n}; pass more images "
            "or --val-images / --val-masks",
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(order[num_val:])), Subset(
        dataset, sorted(order[:num_val])
    )


def _load_model(args: argparse.Namespace) -> Any:
    model = build_model_from_args(args, img_size=args.image_size)
    if args.image_size % model.patch_size != 0:
        raise UsageError(
            "--image-size",
            args.image_size,
            f"must be a multiple of the checkpoint's patch size {model.patch_size}",
        )
    return model.to(args.device).eval()


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Runs ``lightly-cotap eval`` with parsed arguments.

    Args:
        args: Namespace of a parser set up by :func:`add_eval_arguments`.

    Returns:
        The report that was written to ``OUT/report.json`` (metrics of every
        evaluation, ``settings`` and ``checkpoint``).

    Raises:
        UsageError: If a folder, a mask, the checkpoint or an option is invalid
            (checked before any feature is computed).
    """
    for option, value, minimum in (
        ("--image-size", args.image_size, 1),
        ("--batch-size", args.batch_size, 1),
        ("--label-size", args.label_size, 0),
    ):
        if value < minimum:
            raise UsageError(option, value, f"must be >= {minimum}")
    if (args.val_images is None) != (args.val_masks is None):
        raise UsageError("pass both --val-images and --val-masks, or neither")
    if args.val_images is not None and args.val_fraction is not None:
        raise UsageError(
            "--val-fraction",
            args.val_fraction,
            "cannot be combined with --val-images / --val-masks",
        )
    fraction = 0.3 if args.val_fraction is None else args.val_fraction
    if args.val_images is None and not 0 < fraction < 1:
        raise UsageError("--val-fraction", fraction, "must lie in (0, 1)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError("--out", args.out, "exists and is not a folder")

    train_folder = _segmentation_folder(
        args.images, args.masks, args.image_size, "--images", "--masks"
    )
    folders = [train_folder]
    scan = scan_masks(train_folder.samples, "--images", "--masks")
    if args.val_images is not None:
        val_folder = _segmentation_folder(
            args.val_images,
            args.val_masks,
            args.image_size,
            "--val-images",
            "--val-masks",
        )
        folders.append(val_folder)
        scan = scan_masks(val_folder.samples, "--val-images", "--val-masks", scan)
        train_set: Any = train_folder
        val_set: Any = val_folder
    else:
        train_set, val_set = _split(train_folder, fraction, args.seed)
    names = class_names_file(args.masks)
    declared, declared_by = args.num_classes, "--num-classes"
    if declared is None and names:
        declared = len(names)
        declared_by = str(Path(args.masks).parent / "classes.json")
    ignore_index = 255 if args.ignore_index is None else args.ignore_index
    decision = decide_classes(
        scan,
        num_classes=declared,
        declared_by=declared_by,
        ignore_index=ignore_index,
        ignore_index_given=args.ignore_index is not None,
        ignore_unknown=args.ignore_unknown_labels,
    )
    num_classes = decision.num_classes
    for folder in folders:
        folder.label_mapping = decision.mapping
    for message in decision.messages:
        print(message, file=sys.stderr)

    model = _load_model(args)
    over_k = args.overclustering_k
    if over_k is None:
        # 4 * C as in evaluate_dense, but at most the number of validation patches.
        grid = args.image_size // model.patch_size
        over_k = min(4 * num_classes, len(val_set) * grid * grid)
    progress: Progress = "lines" if args.no_progress else True
    skip = set(args.skip)
    report = evaluate_dense(
        dense_feature_fn(model),
        train_set,
        val_set,
        num_classes,
        label_size=args.label_size or None,
        batch_size=args.batch_size,
        device=args.device,
        module=model,
        ignore_index=ignore_index,
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
        class_names=names if names and len(names) == num_classes else None,
        label_notes=decision.messages,
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
    report = dict(jsonable(report))
    write_json(out / "report.json", report)
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
            a :class:`~lightly_cotap.user_errors.UsageError`.
    """
    report: dict[str, Any] = run_command(run_eval, args, "lightly-cotap eval")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command on its own (``python -m lightly_cotap.eval.command``).

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Exit code: 0 on success, 2 on a user error (message on stderr).
    """
    parser = add_eval_arguments(
        argparse.ArgumentParser(
            prog="lightly-cotap eval",
            description="Dense evaluation of a checkpoint.",
            formatter_class=HelpFormatter,
        )
    )
    add_debug_argument(parser)
    run_eval_command(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
