"""The parts of a training run built from its settings: data, model and trainer."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import Dataset

from lightly_cotap.data import SampleImageDataset
from lightly_cotap.data.image_folder import ImageFolderDataset
from lightly_cotap.data.image_io import IMAGE_EXTENSIONS
from lightly_cotap.data.neighbors import NeighborIndex
from lightly_cotap.data.sample_images import sample_image_paths
from lightly_cotap.train.cotap_module import CoTAPModule
from lightly_cotap.train.run_folder import atomic_checkpoint_io, say
from lightly_cotap.train.settings import ARCHITECTURE_KEYS, flag
from lightly_cotap.user_errors import UsageError, first_lines


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


def build_dataset(
    data: str | None, *, strict: bool, progress: bool, num_threads: int
) -> tuple[Dataset[Any], list[Path]]:
    """The training images and their files (checked; unreadable ones skipped).

    Args:
        data: The ``--data`` folder, or None for the embedded sample photos.
        strict: Refuse unreadable images instead of skipping them with a count.
        progress: Show a progress bar while the folder is checked.
        num_threads: Threads that check the images.

    Returns:
        The dataset and the files of its images.

    Raises:
        UsageError: If the folder holds no images, fewer than two readable ones,
            or (``strict``) unreadable ones.
    """
    if data is None:
        return SampleImageDataset(), sample_image_paths()
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


def fit_to_dataset(s: dict[str, Any], num_images: int, world_size: int) -> None:
    """Shrinks the batch and the number of neighbours to a small data set.

    Args:
        s: The settings; ``batch_size`` and ``num_neighbors`` are changed in place
            (with a message).
        num_images: Images of the data set.
        world_size: Number of training processes.

    Raises:
        UsageError: If a process would get fewer than two images.
    """
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


def neighbor_cache_key(files: Sequence[Path], s: Mapping[str, Any]) -> str:
    """Identity of what the neighbour index depends on.

    The image files (names, sizes and modification times, which change whenever
    the contents do), the initial weights (the ``--init`` file's identity, or the
    seed of a random initialisation), the architecture, the embedding size and k.

    Args:
        files: The image files of the data set.
        s: The settings.

    Returns:
        A SHA-256 hex digest of those inputs.
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


def given_neighbor_index(path: Path, num_images: int) -> Any:
    """A ``--neighbors`` file made elsewhere (no cache key), used as given.

    Args:
        path: The ``--neighbors`` file.
        num_images: Images of the data set.

    Returns:
        The index, or None if the file does not exist or was written by a run
        (then it is a cache, rebuilt when its key differs).

    Raises:
        UsageError: If the file cannot be read or was built for another data set.
    """
    if not path.is_file() or NeighborIndex.stored_cache_key(path) is not None:
        return None
    try:
        return NeighborIndex.load(path, expected_length=num_images)
    except (OSError, ValueError) as ex:
        raise UsageError("--neighbors", path, first_lines(str(ex))) from ex


def build_module(s: Mapping[str, Any]) -> Any:
    """The CoTAPModule of the settings; checks the crop and pooling sizes.

    Args:
        s: The settings.

    Returns:
        The module.

    Raises:
        UsageError: If the backbone cannot be built with the settings, a crop size
            is not a multiple of the patch size, or a pooling size exceeds the grid.
    """
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
                flag(key), s[key], f"must be a multiple of the patch size {patch_size}"
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


def build_trainer(
    args: argparse.Namespace, s: Mapping[str, Any], output_dir: Path
) -> tuple[Any, Any]:
    """The Lightning Trainer (atomic checkpoints, always ``last.ckpt``) and logger.

    Args:
        args: Parsed arguments (accelerator, devices, strategy, precision, ...).
        s: The settings.
        output_dir: The run folder.

    Returns:
        ``(trainer, logger)``.

    Raises:
        UsageError: If Lightning refuses the device options.
    """
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
