"""``lightly-cotap train``: CoTAP training from the command line.

Without ``--data`` a short demo runs on the embedded sample photos on CPU (a tiny
ViT, small crops, a few dozen steps). With ``--data DIR`` the paper's recipe runs
(ViT-S/16, 224 / 96 px crops, learning rates 3e-5 / 3e-4, ...), typically from an
image-level SSL checkpoint given with ``--init``. Every setting can be overridden.

Outputs in ``--output-dir`` (every file is written atomically):

- ``settings.json`` (every setting of the run, written before training),
- ``checkpoints/last.ckpt`` (Lightning checkpoint; continue with ``--resume``),
- ``backbone.pth`` (the student backbone, :func:`lightly_cotap.export.export_backbone`
  format, loadable with :func:`lightly_cotap.export.load_backbone`),
- ``dense_features.png`` (sample images with the PCA-to-RGB map of their dense
  features before and after training),
- ``logs/.../metrics.csv`` (every loss term per step),
- ``neighbors.npz`` (the neighbour index, unless ``--neighbors`` names a file; it is
  reused only for the same image files, initial weights and number of neighbours).

A folder that holds a run is never overwritten silently: ``--resume`` continues it
with its own settings (flags given again override them, with a message) and
``--overwrite`` replaces it. Everything a run needs is checked before any work; a
user error is one line (exit code 2, ``--debug`` shows the traceback). Images that
do not decode are skipped with a count (``--strict`` refuses them), a data set
smaller than a batch trains with a smaller batch, and a run that trains no step
fails instead of exporting its initial weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightly_cotap.atomic_write import write_json
from lightly_cotap.eval.model_features import dense_feature_fn
from lightly_cotap.train.run_folder import (
    RESUME_OWN_RUN,
    atomic_checkpoint_io,
    clear_run,
    is_first_process,
    resume_point,
    say,
)
from lightly_cotap.user_errors import (
    UsageError,
    add_debug_argument,
    checkpoint_error,
    first_lines,
    run_command,
)

#: Preset of the no-argument demo: tiny ViT, small crops, CPU-friendly.
DEMO_PRESET: dict[str, Any] = dict(
    backbone="vit_tiny_patch16_224",
    patch_size=8,
    depth=4,
    embed_dim=96,
    num_heads=3,
    global_crop_size=64,
    local_crop_size=32,
    n_local_views=2,
    batch_size=4,
    max_steps=60,
    num_neighbors=3,
    head_hidden_dim=256,
    head_bottleneck_dim=64,
    patch_prototypes=64,
    cls_prototypes=128,
    num_prototypes=8,
    prototype_bank_size=32,
    prototype_bank_update=8,
    kmeans_iters=50,
    pool_sizes=(4, 8),
    roi_output_size=4,
    patch_queue_size=4096,
    patch_queue_update_size=256,
    cls_queue_size=256,
    cls_queue_update_size=16,
    backbone_lr=2e-4,
    head_lr=2e-3,
    momentum_start=0.9997,
    momentum_end=0.9999,
    log_every_n_steps=1,
    checkpoint_every_n_steps=20,
    num_workers=0,
    visualize_size=128,
)

#: Preset with ``--data``: the paper's ViT-S/16 recipe (per process).
PAPER_PRESET: dict[str, Any] = dict(
    backbone="vit_small_patch16_224",
    patch_size=None,
    depth=None,
    embed_dim=None,
    num_heads=None,
    global_crop_size=224,
    local_crop_size=96,
    n_local_views=4,
    batch_size=28,
    max_steps=240_000,
    num_neighbors=7,
    head_hidden_dim=2048,
    head_bottleneck_dim=256,
    patch_prototypes=512,
    cls_prototypes=4096,
    num_prototypes=64,
    prototype_bank_size=1024,
    prototype_bank_update=32,
    kmeans_iters=300,
    pool_sizes=(7, 14),
    roi_output_size=6,
    patch_queue_size=65536,
    patch_queue_update_size=2048,
    cls_queue_size=8192,
    cls_queue_update_size=100,
    backbone_lr=3e-5,
    head_lr=3e-4,
    momentum_start=0.9997,
    momentum_end=0.9999,
    log_every_n_steps=50,
    checkpoint_every_n_steps=1600,
    num_workers=8,
    visualize_size=448,
)

#: Settings of a run besides the preset's, with their defaults.
RUN_DEFAULTS: dict[str, Any] = dict(
    data=None,
    init=None,
    neighbors=None,
    no_filter=False,
    p_self=0.0,
    seed=0,
    gather_distributed=False,
)

#: Settings that fix the shapes of the trained weights: a resumed run keeps them.
ARCHITECTURE_KEYS = (
    "backbone",
    "patch_size",
    "depth",
    "embed_dim",
    "num_heads",
    "no_filter",
    "global_crop_size",
    "head_hidden_dim",
    "head_bottleneck_dim",
    "patch_prototypes",
    "cls_prototypes",
    "num_prototypes",
)

#: Settings that are file paths (stored absolute, so a run resumes from anywhere).
_PATH_KEYS = ("data", "init", "neighbors")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the arguments of ``lightly-cotap train`` to a parser.

    Arguments left at None take their value from the preset (demo without
    ``--data``, paper recipe with it).

    Args:
        parser: The (sub)parser to fill.
    """
    p = parser.add_argument
    p(
        "--data",
        default=None,
        help="Image folder (LightlyDataset). Default: the embedded sample photos (demo).",
    )
    p("--output-dir", default="cotap_run", help="Output folder (default: cotap_run).")
    p(
        "--preset",
        choices=("auto", "demo", "paper"),
        default="auto",
        help="Defaults to use: auto = demo without --data, paper with it.",
    )
    p(
        "--init",
        default=None,
        help="Checkpoint to start from (DINO / iBOT / timm / CoTAP / lightly-cotap export).",
    )
    p(
        "--resume",
        nargs="?",
        const=RESUME_OWN_RUN,
        default=None,
        metavar="CHECKPOINT",
        help="Continue a run with its settings.json: without a path the run in "
        "--output-dir (its checkpoints/last.ckpt), else this Lightning checkpoint. "
        "Flags given again override the run's settings.",
    )
    p(
        "--overwrite",
        action="store_true",
        help="Replace the run in --output-dir (by default a folder that holds a run "
        "is refused).",
    )
    p(
        "--strict",
        action="store_true",
        help="Refuse --data with unreadable images (by default they are skipped "
        "with a count and their names).",
    )
    p(
        "--backbone",
        default=None,
        help="timm ViT name (demo: vit_tiny_patch16_224, paper: vit_small_patch16_224).",
    )
    p("--patch-size", type=int, default=None, help="Override the ViT patch size.")
    p("--depth", type=int, default=None, help="Override the ViT depth.")
    p("--embed-dim", type=int, default=None, help="Override the ViT width.")
    p("--num-heads", type=int, default=None, help="Override the ViT heads.")
    p(
        "--no-filter",
        action="store_true",
        default=None,
        help="Train without the object-aware filter.",
    )
    p("--global-crop-size", type=int, default=None)
    p("--local-crop-size", type=int, default=None)
    p("--n-local-views", type=int, default=None)
    p(
        "--neighbors",
        default=None,
        help=".npz neighbour index (built with the initial backbone and cached if missing).",
    )
    p(
        "--num-neighbors",
        type=int,
        default=None,
        help="Neighbours per image (paper: 7).",
    )
    p(
        "--p-self",
        type=float,
        default=None,
        help="Probability of pairing an image with itself (default 0).",
    )
    p("--batch-size", type=int, default=None, help="Pairs per process.")
    p("--num-workers", type=int, default=None)
    p("--max-steps", type=int, default=None)
    p("--backbone-lr", type=float, default=None)
    p("--head-lr", type=float, default=None)
    p("--momentum-start", type=float, default=None)
    p("--momentum-end", type=float, default=None)
    p("--head-hidden-dim", type=int, default=None)
    p("--head-bottleneck-dim", type=int, default=None)
    p("--patch-prototypes", type=int, default=None)
    p("--cls-prototypes", type=int, default=None)
    p(
        "--num-prototypes",
        type=int,
        default=None,
        help="Object prototypes of the filter.",
    )
    p("--prototype-bank-size", type=int, default=None)
    p("--prototype-bank-update", type=int, default=None)
    p("--kmeans-iters", type=int, default=None)
    p(
        "--pool-sizes",
        type=int,
        nargs="+",
        default=None,
        help="CoTAP pooling sizes (paper: 7 14).",
    )
    p("--roi-output-size", type=int, default=None)
    p("--patch-queue-size", type=int, default=None)
    p("--patch-queue-update-size", type=int, default=None)
    p("--cls-queue-size", type=int, default=None)
    p("--cls-queue-update-size", type=int, default=None)
    p("--accelerator", default="auto")
    p("--devices", default="auto", help="Devices per node (int or 'auto').")
    p("--num-nodes", type=int, default=1)
    p(
        "--strategy",
        default="auto",
        help="Lightning strategy; 'ddp' means DDP with unused-parameter detection.",
    )
    p(
        "--precision",
        default="auto",
        help="'auto': bf16-mixed / 16-mixed on GPU, 32 on CPU.",
    )
    p(
        "--gather-distributed",
        action="store_true",
        default=None,
        help="Distributed CoTAP list, Sinkhorn and prototype bank.",
    )
    p("--seed", type=int, default=None, help="Random seed (default 0).")
    p(
        "--num-threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for the CPU demo, else torch's choice).",
    )
    p("--log-every-n-steps", type=int, default=None)
    p("--checkpoint-every-n-steps", type=int, default=None)
    p("--no-visualize", action="store_true", help="Skip the before/after PNG.")
    p("--visualize-size", type=int, default=None, help="Image size of the PNG.")
    p("--no-progress-bar", action="store_true")
    p(
        "--compile",
        action="store_true",
        help="torch.compile the student, the teacher and the objective (the first "
        "steps take longer while compiling).",
    )


def resolve_settings(
    args: argparse.Namespace, saved: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Merges the preset, a resumed run's settings and the given arguments.

    Args:
        args: Parsed arguments of :func:`add_train_arguments`.
        saved: Settings of the run being resumed (its ``settings.json``), or None.

    Returns:
        The settings: the given arguments, else the saved settings, else the preset
        (``--preset auto``: demo without ``--data``, paper recipe with it) and
        :data:`RUN_DEFAULTS`. Paths are absolute.
    """
    preset_name = args.preset
    if preset_name == "auto" and saved is not None and "preset" in saved:
        preset_name = saved["preset"]
    elif preset_name == "auto":
        preset_name = "demo" if args.data is None else "paper"
    preset = DEMO_PRESET if preset_name == "demo" else PAPER_PRESET
    settings = {**preset, **RUN_DEFAULTS}
    if saved is not None:
        settings.update({k: v for k, v in saved.items() if k in settings})
    for key in settings:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    settings["pool_sizes"] = tuple(settings["pool_sizes"])
    for key in _PATH_KEYS:
        if settings[key] is not None:
            settings[key] = str(Path(settings[key]).resolve())
    settings["preset"] = preset_name
    return settings


def _check_settings(s: Mapping[str, Any]) -> None:
    """Refuses values the recipe cannot run with (before any work)."""
    at_least = {
        "batch_size": 1,
        "max_steps": 1,
        "num_neighbors": 1,
        "global_crop_size": 1,
        "local_crop_size": 1,
        "n_local_views": 0,
        "head_hidden_dim": 1,
        "head_bottleneck_dim": 1,
        "patch_prototypes": 1,
        "cls_prototypes": 1,
        "num_prototypes": 1,
        "prototype_bank_size": 1,
        "prototype_bank_update": 1,
        "kmeans_iters": 1,
        "roi_output_size": 1,
        "patch_queue_size": 0,
        "patch_queue_update_size": 1,
        "cls_queue_size": 0,
        "cls_queue_update_size": 1,
        "log_every_n_steps": 1,
        "checkpoint_every_n_steps": 1,
        "num_workers": 0,
        "visualize_size": 1,
        "patch_size": 1,
        "depth": 1,
        "embed_dim": 1,
        "num_heads": 1,
    }
    for key, minimum in at_least.items():
        if s[key] is not None and s[key] < minimum:
            raise UsageError(_flag(key), s[key], f"must be an integer >= {minimum}")
    if any(size < 1 for size in s["pool_sizes"]):
        raise UsageError(
            "--pool-sizes", list(s["pool_sizes"]), "must be positive integers"
        )
    for key in ("backbone_lr", "head_lr"):
        if not s[key] > 0:
            raise UsageError(_flag(key), s[key], "must be a positive learning rate")
    for key in ("momentum_start", "momentum_end", "p_self"):
        if not 0 <= s[key] <= 1:
            raise UsageError(_flag(key), s[key], "must lie in [0, 1]")
    if s["data"] is not None and not Path(s["data"]).is_dir():
        raise UsageError("--data", s["data"], "is not a folder of images")
    from lightly_cotap.models.cotap_vit import vit_name_problem

    problem = vit_name_problem(s["backbone"])
    if problem is not None:
        raise UsageError("--backbone", s["backbone"], problem)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _precision(precision: str, accelerator: str) -> str:
    if precision != "auto":
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def _strategy(strategy: str) -> Any:
    # ViT + filter: the prototypes get no gradient before their initialisation.
    return "ddp_find_unused_parameters_true" if strategy == "ddp" else strategy


def _devices(devices: str) -> int | str:
    return int(devices) if devices.isdigit() else devices


def _build_dataset(
    data: str | None, *, strict: bool, progress: bool, num_threads: int
) -> tuple[Dataset[Any], list[Path]]:
    """The training images and their files (checked; unreadable ones skipped)."""
    if data is None:
        from lightly_cotap.data import SampleImageDataset
        from lightly_cotap.data.sample_images import sample_image_paths

        return SampleImageDataset(), sample_image_paths()
    from lightly_cotap.data.image_folder import ImageFolderDataset
    from lightly_cotap.data.image_io import IMAGE_EXTENSIONS

    dataset = ImageFolderDataset(data, num_threads=num_threads, progress=progress)
    total = len(dataset) + len(dataset.skipped)
    if dataset.skipped:
        problems = "; ".join(problem for _, problem in dataset.skipped[:3])
        more = len(dataset.skipped) - 3
        listing = problems + (f"; and {more} more" if more > 0 else "")
        if strict:
            raise UsageError(
                "--data",
                data,
                f"{len(dataset.skipped)} of {total} images cannot be read: "
                f"{listing}; replace or remove them, or drop --strict to skip them",
            )
        say(
            f"--data: skipping {len(dataset.skipped)} of {total} images that cannot "
            f"be read: {listing} (--strict refuses them)"
        )
    if total == 0:
        raise UsageError(
            "--data",
            data,
            f"holds no images ({' '.join(IMAGE_EXTENSIONS)}, at any depth)",
        )
    if len(dataset) < 2:
        raise UsageError(
            "--data",
            data,
            f"holds {len(dataset)} readable image(s); CoTAP pairs every image with "
            "a neighbour image, so it needs at least 2 (and one batch)",
        )
    return dataset, [dataset.root / name for name in dataset.files]


def _fit_to_dataset(s: dict[str, Any], num_images: int, world_size: int) -> None:
    """Shrinks the batch and the number of neighbours to a small data set."""
    per_process = num_images // world_size
    if per_process < 2:
        raise UsageError(
            "--data",
            s["data"] or "(sample images)",
            f"{num_images} images give {per_process} per process for {world_size} "
            "processes; CoTAP needs batches of at least 2 images",
        )
    if s["batch_size"] > per_process:
        say(
            f"--batch-size: {s['batch_size']} is more than the {per_process} images "
            f"per process: training with batch size {per_process}"
        )
        s["batch_size"] = per_process
    if s["num_neighbors"] > num_images - 1:
        say(
            f"--num-neighbors: {s['num_neighbors']} is more than the other "
            f"{num_images - 1} images: using {num_images - 1}"
        )
        s["num_neighbors"] = num_images - 1


def _neighbor_cache_key(files: Sequence[Path], s: Mapping[str, Any]) -> str:
    """Identity of what the neighbour index depends on.

    The image files (names, sizes and modification times, which change whenever
    the contents do), the initial weights (the ``--init`` file's identity, or the
    seed of a random initialisation), the architecture, the embedding size and k.
    """

    def identity(path: Path) -> list[Any]:
        stat = path.stat()
        return [str(path), stat.st_size, stat.st_mtime_ns]

    inputs = {
        "files": [identity(path) for path in files],
        "init": identity(Path(s["init"])) if s["init"] else ["random", s["seed"]],
        "architecture": {k: s[k] for k in ARCHITECTURE_KEYS},
        "k": s["num_neighbors"],
    }
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()


def _given_neighbor_index(path: Path, num_images: int) -> Any:
    """A ``--neighbors`` file made elsewhere (no cache key), used as given."""
    from lightly_cotap.data.semantic_pairs import NeighborIndex

    if not path.is_file() or NeighborIndex.stored_cache_key(path) is not None:
        return None
    try:
        return NeighborIndex.load(path, expected_length=num_images)
    except (OSError, ValueError) as ex:
        raise UsageError("--neighbors", path, first_lines(str(ex))) from ex


def _report_overrides(saved: Mapping[str, Any], s: Mapping[str, Any]) -> None:
    """Prints the settings that differ from the resumed run's; refuses new shapes."""
    for key, old in saved.items():
        if key not in s or key == "preset":
            continue
        new = list(s[key]) if isinstance(s[key], tuple) else s[key]
        if new == old:
            continue
        if key in ARCHITECTURE_KEYS or key == "init":
            raise UsageError(
                _flag(key),
                new,
                f"the resumed run was trained with {old}; a resumed run keeps its "
                "architecture and weights (start a new run from its weights with "
                "--init)",
            )
        say(f"{_flag(key)}: {new} overrides the resumed run's {old}")


def _visualization_images(size: int, count: int = 4) -> Tensor:
    from torchvision.transforms import functional as TF

    from lightly_cotap.data import load_sample_images
    from lightly_cotap.data.segmentation_folder import image_to_tensor

    return torch.stack(
        [
            image_to_tensor(TF.center_crop(TF.resize(image, size), [size, size]))
            for image in load_sample_images()[:count]
        ]
    )


@torch.no_grad()
def _dense_features(backbone: torch.nn.Module, images: Tensor) -> Tensor:
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    dense: Tensor = dense_feature_fn(backbone)(images.to(device)).float().cpu()
    backbone.train(was_training)
    return dense


def _save_before_after(
    images: Tensor, before: Tensor, after: Tensor, path: Path
) -> Path:
    from lightly.transforms.utils import IMAGENET_NORMALIZE

    from lightly_cotap.eval.visualize import pca_rgb, save_image_grid, to_uint8_images

    size = tuple(images.shape[-2:])
    rgb = to_uint8_images(
        images, mean=IMAGENET_NORMALIZE["mean"], std=IMAGENET_NORMALIZE["std"]
    )
    pca_before = pca_rgb(before, size=size)  # type: ignore[arg-type]
    pca_after = pca_rgb(after, size=size)  # type: ignore[arg-type]
    rows = [[img, b, a] for img, b, a in zip(rgb, pca_before, pca_after)]
    return save_image_grid(rows, path)


def _build_module(s: Mapping[str, Any]) -> Any:
    """The CoTAPModule of the settings; checks the crop and pooling sizes."""
    from lightly_cotap.train.cotap_module import CoTAPModule

    backbone_kwargs: dict[str, Any] = {"img_size": s["global_crop_size"]}
    for key in ("patch_size", "depth", "embed_dim", "num_heads"):
        if s[key] is not None:
            backbone_kwargs[key] = s[key]
    try:
        module = CoTAPModule(
            s["backbone"],
            backbone_kwargs=backbone_kwargs,
            use_filter=not s["no_filter"],
            num_prototypes=s["num_prototypes"],
            head_hidden_dim=s["head_hidden_dim"],
            head_bottleneck_dim=s["head_bottleneck_dim"],
            patch_prototypes=s["patch_prototypes"],
            cls_prototypes=s["cls_prototypes"],
            objective_kwargs=dict(
                pool_sizes=tuple(s["pool_sizes"]),
                roi_output_size=s["roi_output_size"],
                patch_queue_size=s["patch_queue_size"],
                patch_queue_update_size=s["patch_queue_update_size"],
                cls_queue_size=s["cls_queue_size"],
                cls_queue_update_size=s["cls_queue_update_size"],
            ),
            prototype_bank_size=s["prototype_bank_size"],
            prototype_bank_update=s["prototype_bank_update"],
            kmeans_iters=s["kmeans_iters"],
            backbone_lr=s["backbone_lr"],
            head_lr=s["head_lr"],
            momentum_start=s["momentum_start"],
            momentum_end=s["momentum_end"],
            max_steps=s["max_steps"],
            gather_distributed=s["gather_distributed"],
        )
    except (ValueError, AssertionError) as ex:
        raise UsageError(
            "--backbone",
            s["backbone"],
            f"cannot be built with these settings: {first_lines(str(ex))}",
        ) from ex
    patch_size = module.backbone.patch_size
    for key in ("global_crop_size", "local_crop_size"):
        if s[key] % patch_size:
            raise UsageError(
                _flag(key), s[key], f"must be a multiple of the patch size {patch_size}"
            )
    grid = s["global_crop_size"] // patch_size
    if max(s["pool_sizes"]) > grid:
        raise UsageError(
            "--pool-sizes",
            list(s["pool_sizes"]),
            f"must fit the {grid} x {grid} patch grid of --global-crop-size "
            f"{s['global_crop_size']}",
        )
    return module


def _build_trainer(
    args: argparse.Namespace, s: Mapping[str, Any], output_dir: Path
) -> tuple[Any, Any]:
    """The Lightning Trainer (atomic checkpoints, always ``last.ckpt``) and logger."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    logger = CSVLogger(save_dir=str(output_dir), name="logs")
    try:
        trainer = pl.Trainer(
            max_steps=s["max_steps"],
            accelerator=args.accelerator,
            devices=_devices(str(args.devices)),
            num_nodes=args.num_nodes,
            strategy=_strategy(args.strategy),
            precision=_precision(args.precision, args.accelerator),  # type: ignore[arg-type]
            sync_batchnorm=args.strategy == "ddp",
            use_distributed_sampler=True,
            logger=logger,
            log_every_n_steps=s["log_every_n_steps"],
            callbacks=[
                ModelCheckpoint(
                    dirpath=str(output_dir / "checkpoints"),
                    save_last=True,
                    every_n_train_steps=s["checkpoint_every_n_steps"],
                    save_top_k=0,
                    # Always last.ckpt (never last-v1.ckpt next to another run's).
                    enable_version_counter=False,
                )
            ],
            plugins=[atomic_checkpoint_io()],
            enable_progress_bar=not args.no_progress_bar,
            enable_model_summary=False,
        )
    except (ValueError, RuntimeError, TypeError) as ex:
        raise UsageError(
            "--accelerator / --devices / --strategy / --precision",
            f"{args.accelerator} / {args.devices} / {args.strategy} / {args.precision}",
            first_lines(str(ex)),
        ) from ex
    return trainer, logger


def run_train(args: argparse.Namespace) -> dict[str, Path]:
    """Runs CoTAP training as configured by the parsed arguments.

    Args:
        args: Parsed arguments of :func:`add_train_arguments`.

    Returns:
        Paths of the outputs: ``checkpoint``, ``backbone``, ``metrics`` and (unless
        disabled) ``visualization``.

    Raises:
        UsageError: If a setting, the data, the output folder or a checkpoint cannot
            be used (checked before training), or no training step ran.
    """
    import pytorch_lightning as pl

    from lightly_cotap.data.semantic_pairs import (
        NeighborIndex,
        SemanticPairDataset,
        default_embedding_transform,
    )
    from lightly_cotap.export import export_backbone
    from lightly_cotap.transforms import CoTAPTransform

    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError("--output-dir", output_dir, "exists and is not a folder")
    resume, start_step, saved = resume_point(args, output_dir)
    s = resolve_settings(args, saved)
    _check_settings(s)
    if saved is not None:
        _report_overrides(saved, s)
    if resume is not None and start_step >= s["max_steps"]:
        raise UsageError(
            "--max-steps",
            s["max_steps"],
            f"the resumed run already trained {start_step} steps; pass a larger "
            "--max-steps to train further",
        )
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    elif s["preset"] == "demo" and args.accelerator in (None, "auto", "cpu"):
        # The demo ViT is tiny: one intra-op thread is as fast, and several threads
        # on a busy CPU oversubscribe it (measured 44 s vs. 8.5 min here).
        torch.set_num_threads(1)
    pl.seed_everything(s["seed"], workers=True)
    module = _build_module(s)
    if s["init"] is not None and resume is None:
        try:
            say(module.load_backbone_weights(s["init"]))
        except (FileNotFoundError, ValueError) as ex:
            raise checkpoint_error(
                "--init",
                s["init"],
                ex,
                unsafe_fix="convert it first with python -m lightly_cotap.export "
                "--checkpoint FILE --output converted.pth --unsafe-load (and --arch "
                "if asked)",
                mismatch_fix="pass the --backbone (and --patch-size, --depth, "
                "--embed-dim, --num-heads) it was trained with",
            ) from ex
    if args.compile:
        module.compile_networks()

    trainer, logger = _build_trainer(args, s, output_dir)

    dataset, files = _build_dataset(
        s["data"],
        strict=args.strict,
        progress=not args.no_progress_bar,
        num_threads=max(1, s["num_workers"]),
    )
    _fit_to_dataset(s, len(dataset), trainer.world_size)  # type: ignore[arg-type]
    neighbors_path = Path(s["neighbors"] or output_dir / "neighbors.npz")
    given_index = (
        _given_neighbor_index(neighbors_path, len(dataset))  # type: ignore[arg-type]
        if s["neighbors"] is not None
        else None
    )
    if given_index is not None:
        s["num_neighbors"] = given_index.k
    if is_first_process():
        if args.overwrite:
            clear_run(output_dir)
        write_json(output_dir / "settings.json", _jsonable_settings(s))
    if given_index is not None:
        index = given_index
    else:
        cache_key = _neighbor_cache_key(files, s)
        stored = NeighborIndex.stored_cache_key(neighbors_path)
        if stored is not None and stored != cache_key:
            say(
                f"{neighbors_path} was built for other images, initial weights or "
                "--num-neighbors: rebuilding it"
            )
        # Neighbours from the initial backbone (an image-level SSL checkpoint in the
        # paper's setting; with a random demo ViT they are arbitrary). Every process
        # builds the same index; the file is written atomically.
        module.backbone.eval()
        index = NeighborIndex.load_or_build(
            neighbors_path,
            dataset,
            module.backbone,
            k=s["num_neighbors"],
            cache_key=cache_key,
            transform=default_embedding_transform(s["global_crop_size"]),
            batch_size=min(64, s["batch_size"] * 4),
            progress=not args.no_progress_bar,
        )
        module.backbone.train()
    transform = CoTAPTransform(
        global_crop_size=s["global_crop_size"],
        local_crop_size=s["local_crop_size"],
        n_local_views=s["n_local_views"],
    )
    pairs = SemanticPairDataset(
        dataset, neighbors=index, p_self=s["p_self"], transform=transform
    )
    loader = DataLoader(
        pairs,
        batch_size=s["batch_size"],
        shuffle=True,
        drop_last=True,
        num_workers=s["num_workers"],
        persistent_workers=s["num_workers"] > 0,
    )

    images = _visualization_images(s["visualize_size"])
    before = None if args.no_visualize else _dense_features(module.backbone, images)

    trainer.fit(module, loader, ckpt_path=resume)
    if trainer.global_step <= start_step:
        raise UsageError(
            "--batch-size",
            s["batch_size"],
            f"no training step ran ({len(dataset)} images, "  # type: ignore[arg-type]
            f"{trainer.world_size} processes); nothing was exported",
        )
    outputs = {"checkpoint": output_dir / "checkpoints" / "last.ckpt"}
    trainer.save_checkpoint(outputs["checkpoint"])  # collective: all ranks
    if trainer.global_rank == 0:
        outputs["backbone"] = output_dir / "backbone.pth"
        export_backbone(module.backbone.cpu().eval(), outputs["backbone"])
        if before is not None:
            after = _dense_features(module.backbone, images)
            outputs["visualization"] = _save_before_after(
                images, before, after, output_dir / "dense_features.png"
            )
        metrics = Path(logger.log_dir) / "metrics.csv"
        if metrics.is_file():
            outputs["metrics"] = metrics
        for name, path in outputs.items():
            print(f"{name}: {path}")
    return outputs


def _jsonable_settings(s: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lightly_cotap.train.run`` (same as the CLI).

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Exit code (2 on a user error, with a one-line message on stderr).
    """
    parser = argparse.ArgumentParser(prog="lightly-cotap train", description=__doc__)
    add_train_arguments(parser)
    add_debug_argument(parser)
    run_command(run_train, parser.parse_args(argv), "lightly-cotap train")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
