"""``lightly-cotap train``: CoTAP training from the command line.

Without ``--data`` a short demo runs on the embedded sample photos on CPU (a tiny
ViT, small crops, a few dozen steps). With ``--data DIR`` the paper's recipe runs
(ViT-S/16, 224 / 96 px crops, learning rates 3e-5 / 3e-4, ...), typically from an
image-level SSL checkpoint given with ``--init``. Every setting can be overridden.

Outputs in ``--output-dir``:

- ``checkpoints/last.ckpt`` (Lightning checkpoint; continue with ``--resume``),
- ``backbone.pth`` (the student backbone, :func:`lightly_cotap.export.export_backbone`
  format, loadable with :func:`lightly_cotap.export.load_backbone`),
- ``dense_features.png`` (sample images with the PCA-to-RGB map of their dense
  features before and after training),
- ``logs/.../metrics.csv`` (every loss term per step),
- ``neighbors.npz`` (the neighbour index, unless ``--neighbors`` names a file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

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
        default=None,
        help="Lightning checkpoint to resume from (e.g. OUTPUT/checkpoints/last.ckpt).",
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
    p("--no-filter", action="store_true", help="Train without the object-aware filter.")
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
        default=0.0,
        help="Probability of pairing an image with itself.",
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
        help="Distributed CoTAP list, Sinkhorn and prototype bank.",
    )
    p("--seed", type=int, default=0)
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


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Merges the preset with the given arguments.

    Args:
        args: Parsed arguments of :func:`add_train_arguments`.

    Returns:
        The settings (preset values where an argument is None).
    """
    preset_name = args.preset
    if preset_name == "auto":
        preset_name = "demo" if args.data is None else "paper"
    preset = DEMO_PRESET if preset_name == "demo" else PAPER_PRESET
    settings = dict(preset)
    for key in preset:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = tuple(value) if key == "pool_sizes" else value
    settings["preset"] = preset_name
    return settings


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


def _build_dataset(data: str | None) -> Dataset[Any]:
    if data is None:
        from lightly_cotap.data import SampleImageDataset

        return SampleImageDataset()
    from lightly.data import LightlyDataset

    if not Path(data).is_dir():
        raise ValueError(f"--data must be an image folder, got {data!r}.")
    folder: Dataset[Any] = LightlyDataset(input_dir=data)
    return folder


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
    dense: Tensor = backbone(images.to(device)).dense.float().cpu()
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


def run_train(args: argparse.Namespace) -> dict[str, Path]:
    """Runs CoTAP training as configured by the parsed arguments.

    Args:
        args: Parsed arguments of :func:`add_train_arguments`.

    Returns:
        Paths of the outputs: ``checkpoint``, ``backbone``, ``metrics`` and (unless
        disabled) ``visualization``.
    """
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from lightly_cotap.data.semantic_pairs import (
        NeighborIndex,
        SemanticPairDataset,
        default_embedding_transform,
    )
    from lightly_cotap.export import export_backbone
    from lightly_cotap.train.cotap_module import CoTAPModule
    from lightly_cotap.transforms import CoTAPTransform

    s = resolve_settings(args)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    elif s["preset"] == "demo" and args.accelerator in (None, "auto", "cpu"):
        # The demo ViT is tiny: one intra-op thread is as fast, and several threads
        # on a busy CPU oversubscribe it (measured 44 s vs. 8.5 min here).
        torch.set_num_threads(1)
    pl.seed_everything(args.seed, workers=True)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    backbone_kwargs: dict[str, Any] = {"img_size": s["global_crop_size"]}
    for key in ("patch_size", "depth", "embed_dim", "num_heads"):
        if s[key] is not None:
            backbone_kwargs[key] = s[key]
    module = CoTAPModule(
        s["backbone"],
        backbone_kwargs=backbone_kwargs,
        use_filter=not args.no_filter,
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
        gather_distributed=args.gather_distributed,
    )
    if args.init is not None and args.resume is None:
        print(module.load_backbone_weights(args.init), file=sys.stderr)

    dataset = _build_dataset(args.data)
    neighbors_path = Path(args.neighbors or output_dir / "neighbors.npz")
    num_neighbors = min(s["num_neighbors"], len(dataset) - 1)  # type: ignore[arg-type]
    if neighbors_path.exists():
        index = NeighborIndex.load(neighbors_path, expected_length=len(dataset))  # type: ignore[arg-type]
    else:
        # Neighbours from the initial backbone (an image-level SSL checkpoint in the
        # paper's setting; with a random demo ViT they are arbitrary).
        module.backbone.eval()
        index = NeighborIndex.build(
            dataset,
            module.backbone,
            k=num_neighbors,
            transform=default_embedding_transform(s["global_crop_size"]),
            batch_size=min(64, s["batch_size"] * 4),
            progress=not args.no_progress_bar,
        )
        module.backbone.train()
        # Every process builds the same index; write atomically.
        tmp = neighbors_path.with_name(f".{neighbors_path.stem}.{os.getpid()}.npz")
        index.save(tmp)
        os.replace(tmp, neighbors_path)
    transform = CoTAPTransform(
        global_crop_size=s["global_crop_size"],
        local_crop_size=s["local_crop_size"],
        n_local_views=s["n_local_views"],
    )
    pairs = SemanticPairDataset(
        dataset, neighbors=index, p_self=args.p_self, transform=transform
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

    checkpoint_dir = output_dir / "checkpoints"
    logger = CSVLogger(save_dir=str(output_dir), name="logs")
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
                dirpath=str(checkpoint_dir),
                save_last=True,
                every_n_train_steps=s["checkpoint_every_n_steps"],
                save_top_k=0,
            )
        ],
        enable_progress_bar=not args.no_progress_bar,
        enable_model_summary=False,
    )
    trainer.fit(module, loader, ckpt_path=args.resume)
    outputs = {
        "checkpoint": checkpoint_dir / "last.ckpt",
        "metrics": Path(logger.log_dir) / "metrics.csv",
    }
    trainer.save_checkpoint(outputs["checkpoint"])  # collective: all ranks
    if trainer.global_rank == 0:
        outputs["backbone"] = output_dir / "backbone.pth"
        export_backbone(module.backbone.cpu().eval(), outputs["backbone"])
        if before is not None:
            after = _dense_features(module.backbone, images)
            outputs["visualization"] = _save_before_after(
                images, before, after, output_dir / "dense_features.png"
            )
        with open(output_dir / "settings.json", "w") as f:
            json.dump(
                {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
                f,
                indent=2,
            )
        for name, path in outputs.items():
            print(f"{name}: {path}")
    return outputs


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lightly_cotap.train.run`` (same as the CLI).

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Exit code.
    """
    parser = argparse.ArgumentParser(prog="lightly-cotap train", description=__doc__)
    add_train_arguments(parser)
    run_train(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
