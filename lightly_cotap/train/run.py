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
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightly_cotap.atomic_write import write_json
from lightly_cotap.data.embedding import default_embedding_transform
from lightly_cotap.data.neighbors import NeighborIndex
from lightly_cotap.data.semantic_pairs import SemanticPairDataset
from lightly_cotap.export import export_backbone
from lightly_cotap.train.before_after import (
    dense_features,
    save_before_after,
    visualization_images,
)
from lightly_cotap.train.run_builders import (
    build_dataset,
    build_module,
    build_trainer,
    fit_to_dataset,
    given_neighbor_index,
    neighbor_cache_key,
)
from lightly_cotap.train.run_folder import (
    clear_run,
    is_first_process,
    resume_point,
    say,
)
from lightly_cotap.train.settings import (
    add_train_arguments,
    check_settings,
    jsonable_settings,
    report_overrides,
    resolve_settings,
)
from lightly_cotap.transforms import CoTAPTransform
from lightly_cotap.user_errors import (
    UsageError,
    add_debug_argument,
    checkpoint_error,
    run_command,
)


def run_train(args: argparse.Namespace) -> dict[str, Path]:
    """Runs CoTAP training as configured by the parsed arguments.

    Args:
        args: Parsed arguments of
            :func:`~lightly_cotap.train.settings.add_train_arguments`.

    Returns:
        Paths of the outputs: ``checkpoint``, ``backbone``, ``metrics`` and (unless
        disabled) ``visualization``.

    Raises:
        UsageError: If a setting, the data, the output folder or a checkpoint cannot
            be used (checked before training), or no training step ran.
    """
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError("--output-dir", output_dir, "exists and is not a folder")
    resume, start_step, saved = resume_point(args, output_dir)
    s = resolve_settings(args, saved)
    check_settings(s)
    if saved is not None:
        report_overrides(saved, s)
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
    module = build_module(s)
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

    trainer, logger = build_trainer(args, s, output_dir)

    dataset, files = build_dataset(
        s["data"],
        strict=args.strict,
        progress=not args.no_progress_bar,
        num_threads=max(1, s["num_workers"]),
    )
    fit_to_dataset(s, len(dataset), trainer.world_size)  # type: ignore[arg-type]
    neighbors_path = Path(s["neighbors"] or output_dir / "neighbors.npz")
    given_index = (
        given_neighbor_index(neighbors_path, len(dataset))  # type: ignore[arg-type]
        if s["neighbors"] is not None
        else None
    )
    if given_index is not None:
        s["num_neighbors"] = given_index.k
    if is_first_process():
        if args.overwrite:
            clear_run(output_dir)
        write_json(output_dir / "settings.json", jsonable_settings(s))
    if given_index is not None:
        index = given_index
    else:
        cache_key = neighbor_cache_key(files, s)
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

    images = visualization_images(s["visualize_size"])
    before = None if args.no_visualize else dense_features(module.backbone, images)

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
            after = dense_features(module.backbone, images)
            outputs["visualization"] = save_before_after(
                images, before, after, output_dir / "dense_features.png"
            )
        metrics = Path(logger.log_dir) / "metrics.csv"
        if metrics.is_file():
            outputs["metrics"] = metrics
        for name, path in outputs.items():
            print(f"{name}: {path}")
    return outputs


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
