"""Settings of ``lightly-cotap train``: presets, arguments, merging and checks.

Over 400 lines because every option of the command is declared here with its help
text; the rest (presets, merge with a resumed run, range checks) is short.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightly_cotap.models.cotap_vit import vit_name_problem
from lightly_cotap.train.run_folder import RESUME_OWN_RUN, say
from lightly_cotap.user_errors import UsageError

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
PATH_KEYS = ("data", "init", "neighbors")


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
    for key in PATH_KEYS:
        if settings[key] is not None:
            settings[key] = str(Path(settings[key]).resolve())
    settings["preset"] = preset_name
    return settings


def check_settings(s: Mapping[str, Any]) -> None:
    """Refuses values the recipe cannot run with (before any work).

    Args:
        s: The settings (:func:`resolve_settings`).

    Raises:
        UsageError: Naming the first option whose value is out of range, a
            ``--data`` that is not a folder or an unknown ``--backbone``.
    """
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
            raise UsageError(flag(key), s[key], f"must be an integer >= {minimum}")
    if any(size < 1 for size in s["pool_sizes"]):
        raise UsageError(
            "--pool-sizes", list(s["pool_sizes"]), "must be positive integers"
        )
    for key in ("backbone_lr", "head_lr"):
        if not s[key] > 0:
            raise UsageError(flag(key), s[key], "must be a positive learning rate")
    for key in ("momentum_start", "momentum_end", "p_self"):
        if not 0 <= s[key] <= 1:
            raise UsageError(flag(key), s[key], "must lie in [0, 1]")
    if s["data"] is not None and not Path(s["data"]).is_dir():
        raise UsageError("--data", s["data"], "is not a folder of images")
    problem = vit_name_problem(s["backbone"])
    if problem is not None:
        raise UsageError("--backbone", s["backbone"], problem)


def flag(key: str) -> str:
    """The command-line option of a setting.

    Args:
        key: The setting, e.g. ``"batch_size"``.

    Returns:
        The option, e.g. ``"--batch-size"``.
    """
    return "--" + key.replace("_", "-")


def report_overrides(saved: Mapping[str, Any], s: Mapping[str, Any]) -> None:
    """Prints the settings that differ from the resumed run's; refuses new shapes.

    Args:
        saved: The resumed run's settings (its ``settings.json``).
        s: The settings of this run.

    Raises:
        UsageError: If an architecture setting or ``--init`` differs.
    """
    for key, old in saved.items():
        if key not in s or key == "preset":
            continue
        new = list(s[key]) if isinstance(s[key], tuple) else s[key]
        if new == old:
            continue
        if key in ARCHITECTURE_KEYS or key == "init":
            raise UsageError(
                flag(key),
                new,
                f"the resumed run was trained with {old}; a resumed run keeps its "
                "architecture and weights (start a new run from its weights with "
                "--init)",
            )
        say(f"{flag(key)}: {new} overrides the resumed run's {old}")


def jsonable_settings(s: Mapping[str, Any]) -> dict[str, Any]:
    """The settings with tuples as lists, as ``settings.json`` stores them.

    Args:
        s: The settings.

    Returns:
        A copy that ``json`` writes and reads back unchanged.
    """
    return {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}
