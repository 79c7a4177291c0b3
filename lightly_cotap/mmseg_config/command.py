"""Options and run of ``lightly-cotap mmseg-config``."""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightly_cotap.export import build_model_from_checkpoint
from lightly_cotap.mmseg_config.data import IGNORE_INDEX, MMSegConfigError, scan_data
from lightly_cotap.mmseg_config.render import HEADS, level_indices, render_config
from lightly_cotap.models.checkpoint_files import (
    CheckpointFileError,
    load_checkpoint_file,
)
from lightly_cotap.user_errors import checkpoint_error

#: Iterations of ``--iters`` when not given (the shipped schedules).
DEFAULT_ITERS = {"linear": 20000, "fcn": 40000, "upernet": 40000}
#: Images per GPU of the shipped configs; CPU runs use 2.
GPU_BATCH_SIZE = {"linear": 8, "fcn": 4, "upernet": 4}
CPU_BATCH_SIZE = 2


def add_mmseg_config_arguments(
    parser: argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    """Adds the options of ``lightly-cotap mmseg-config`` to a parser.

    Args:
        parser: The (sub-)parser of the command.

    Returns:
        The same parser.
    """
    parser.add_argument(
        "--data",
        required=True,
        help="Folder with images/{train,val}, masks/{train,val} and optionally "
        "classes.json.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="Exported backbone (lightly-cotap train's backbone.pth or a "
        "lightly_cotap.export file, either format) or a lightly-cotap train "
        "checkpoint.",
    )
    parser.add_argument(
        "--head",
        choices=sorted(HEADS),
        default="linear",
        help="linear: frozen backbone + 1x1 conv; fcn / upernet: fine-tuning.",
    )
    parser.add_argument(
        "--iters",
        type=int,
        default=None,
        help="Training iterations (default: 20000 for linear, 40000 otherwise); "
        "validation and checkpoints every tenth.",
    )
    parser.add_argument(
        "--crop",
        type=int,
        default=512,
        help="Square training crop in pixels (a multiple of the patch size).",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="Images per GPU (default: "
        + ", ".join(f"{n} for {h}" for h, n in GPU_BATCH_SIZE.items())
        + f") or per CPU run (default: {CPU_BATCH_SIZE}).",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="Machine the config is written for (auto: a GPU if torch sees one).",
    )
    parser.add_argument("--output", required=True, help="Config file to write.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace an existing --output."
    )
    return parser


def checkpoint_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The architecture (``meta``) of an export or a lightly-cotap train checkpoint.

    Args:
        path: The checkpoint.

    Returns:
        A :meth:`~lightly_cotap.models.cotap_vit.CoTAPVisionTransformer.get_meta`
        dict.

    Raises:
        MMSegConfigError: If the file is missing or holds neither.
    """
    if not Path(path).is_file():
        raise MMSegConfigError(f"--checkpoint {str(path)!r} is not a file.")
    try:
        meta = load_checkpoint_file(path).get("meta")
        if isinstance(meta, Mapping) and "embed_dim" in meta:
            return dict(meta)
        return build_model_from_checkpoint(path).get_meta()
    except CheckpointFileError as ex:
        error = checkpoint_error(
            "--checkpoint",
            path,
            ex,
            unsafe_fix="convert it first: python -m lightly_cotap.export "
            "--unsafe-load --checkpoint IN --output OUT",
            mismatch_fix="",
        )
        raise MMSegConfigError(str(error)) from ex
    except ValueError as ex:
        hint = (
            "\nExport timm / DINO weights first: python -m lightly_cotap.export "
            "--checkpoint IN --arch NAME --output OUT"
            if "--arch" in str(ex)
            else ""
        )
        raise MMSegConfigError(f"--checkpoint {str(path)!r}: {ex}{hint}") from ex
    except (RuntimeError, EOFError, pickle.UnpicklingError) as ex:
        # what torch.load raises for files that are no torch checkpoint at all
        raise MMSegConfigError(
            f"--checkpoint {str(path)!r} is not a readable PyTorch checkpoint "
            f"({type(ex).__name__}: {ex})."
        ) from ex


def configs_folder() -> Path:
    """The ``mmseg_configs`` folder of this source tree.

    Raises:
        MMSegConfigError: If the package is not installed from a source checkout.
    """
    folder = Path(__file__).resolve().parents[2] / "mmseg_configs"
    if not (folder / "_base_" / "default_runtime.py").is_file():
        raise MMSegConfigError(
            f"mmseg_configs/ not found next to the lightly_cotap package ({folder}); "
            "install lightly-cotap from a source checkout (pip install -e .)."
        )
    return folder


def run_mmseg_config(args: argparse.Namespace) -> Path:
    """Runs ``lightly-cotap mmseg-config`` with parsed arguments.

    Args:
        args: Namespace of a parser set up by :func:`add_mmseg_config_arguments`.

    Returns:
        The written config file.

    Raises:
        MMSegConfigError: On a user error (checked before anything is written).
    """
    try:
        import mmseg
    except ImportError as ex:
        raise MMSegConfigError(
            'mmseg-config needs mmsegmentation: pip install -e ".[mmseg,mmcv-lite]" '
            "(CPU) or the full mmcv + the mmseg extra (GPU, see the README)."
        ) from ex
    iters = DEFAULT_ITERS[args.head] if args.iters is None else args.iters
    if iters < 1:
        raise MMSegConfigError(f"--iters must be positive, got {iters}.")
    if args.batch_size is not None and args.batch_size < 1:
        raise MMSegConfigError(f"--batch-size must be positive, got {args.batch_size}.")
    output = Path(args.output)
    if output.suffix != ".py":
        raise MMSegConfigError(f"--output must be a .py file, got {args.output!r}.")
    if output.exists() and not args.overwrite:
        raise MMSegConfigError(
            f"--output {args.output!r} exists; pass --overwrite to replace it."
        )
    configs_dir = configs_folder()
    meta = checkpoint_meta(args.checkpoint)
    patch = int(meta["patch_size"])
    if args.crop <= 0 or args.crop % patch != 0:
        raise MMSegConfigError(
            f"--crop must be a positive multiple of the patch size {patch} of the "
            f"checkpoint, got {args.crop}."
        )
    level_indices(args.head, int(meta["depth"]))
    data = scan_data(args.data)
    if not (data.root / "classes.json").is_file():
        print(
            f"No classes.json in --data: {len(data.class_names)} classes from "
            f"{data.class_source} ({IGNORE_INDEX} = ignored), named by their ids; "
            f'write {data.root / "classes.json"} as {{"class_names": [...]}} to name '
            "them.",
            file=sys.stderr,
        )
    gpu = _use_gpu(args.device)
    batch_size = args.batch_size
    if batch_size is None:
        batch_size = GPU_BATCH_SIZE[args.head] if gpu else CPU_BATCH_SIZE
    text = render_config(
        data=data,
        checkpoint=Path(args.checkpoint).resolve(),
        meta=meta,
        head=args.head,
        iters=iters,
        crop=args.crop,
        batch_size=batch_size,
        workers=min(4, max(0, (os.cpu_count() or 1) - 1)),
        gpu=gpu,
        configs_dir=configs_dir,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.stem}.{os.getpid()}.tmp.py")
    tmp.write_text(text)
    try:
        check_config(tmp, len(data.class_names))
    except Exception:
        tmp.unlink()
        raise
    tmp.replace(output)
    tools = Path(mmseg.__file__).parent / ".mim" / "tools"
    print(
        f"Wrote {output}. Train (mIoU on masks/val at every validation):\n"
        f"  python {tools / 'train.py'} {output}",
        file=sys.stderr,
    )
    return output


def _use_gpu(device: str) -> bool:
    if device != "auto":
        return device == "gpu"
    return bool(torch.cuda.is_available())


def check_config(path: Path, num_classes: int) -> None:
    """Parses a config and builds its model on the meta device (no memory).

    A forward pass of a meta batch checks the channels from the backbone through
    the neck to the heads.

    Args:
        path: The config file.
        num_classes: Expected number of output classes.

    Raises:
        RuntimeError: If the model's output does not have ``num_classes`` channels.
    """
    # mmengine / mmseg are the optional mmseg extra: imported when a config is checked.
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    cfg = Config.fromfile(str(path))  # imports lightly_cotap.mmseg
    from lightly_cotap.mmseg.runner import ignore_irrelevant_warnings

    ignore_irrelevant_warnings()
    init_default_scope("mmseg")
    crop = tuple(cfg.crop_size)
    with torch.device("meta"):
        model = MODELS.build(cfg.model)
        model.eval()
        logits = model(torch.empty(1, 3, *crop), mode="tensor")
    if logits.shape[1] != num_classes:
        raise RuntimeError(
            f"the written config predicts {logits.shape[1]} classes, not {num_classes}."
        )


def run_mmseg_config_command(args: argparse.Namespace) -> Path:
    """:func:`run_mmseg_config` for the command line: user errors exit with code 2.

    Args:
        args: Parsed arguments.

    Returns:
        The written config file.

    Raises:
        SystemExit: With code 2 and the message on stderr for a user error.
    """
    try:
        return run_mmseg_config(args)
    except MMSegConfigError as ex:
        sys.stderr.write(f"lightly-cotap mmseg-config: error: {ex}\n")
        raise SystemExit(2) from ex
