"""The ``lightly-cotap mmseg-config`` command: an mmseg config for your data.

Usage::

    lightly-cotap mmseg-config --data my_seg --checkpoint cotap_run/backbone.pth \\
        --head fcn --iters 4000 --crop 256 --output my_fcn.py
    python $MMSEG_TOOLS/train.py my_fcn.py

``--data`` holds ``images/{train,val}`` and ``masks/{train,val}`` (masks: single-
channel PNGs of class ids paired with the images by file name, 255 = ignore) and
optionally ``classes.json`` (``{"class_names": [...]}`` or a list). The written
config inherits the model, runtime and schedule of ``mmseg_configs/_base_`` and
states everything it changes: the exported architecture (name, timm overrides,
filter, head widths), the data (classes, crop in every place that needs it), the
machine (data workers, batch size for CPU or GPU) and the schedule (``--iters``
sets max_iters, warm-up, validation and checkpoint intervals). mmseg's own
``tools/train.py`` trains it and logs the validation mIoU.

This module does not import mmsegmentation (the ``lightly-cotap`` parser stays
light); only the final check of the written config does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: Heads of ``--head`` -> the model base of ``mmseg_configs/_base_/models`` and
#: the schedule base of ``mmseg_configs/_base_/schedules``.
HEADS: dict[str, tuple[str, str]] = {
    "linear": ("linear_cotap-vit-{size}.py", "linear_20k.py"),
    "fcn": ("fcn_cotap-vit-{size}.py", "finetune_40k.py"),
    "upernet": ("upernet_cotap-vit-{size}.py", "finetune_40k.py"),
}
#: Iterations of ``--iters`` when not given (the shipped schedules).
DEFAULT_ITERS = {"linear": 20000, "fcn": 40000, "upernet": 40000}
#: Images per GPU of the shipped configs; CPU runs use 2.
GPU_BATCH_SIZE = {"linear": 8, "fcn": 4, "upernet": 4}
CPU_BATCH_SIZE = 2
#: Warm-up of the fine-tuning schedules (iterations), at most a tenth of the run
#: (but 2, the shortest that reaches the base rate).
WARMUP_ITERS = 1500
#: Mask value that is not scored (mmseg's default ignore_index).
IGNORE_INDEX = 255
SPLITS = ("train", "val")


class MMSegConfigError(ValueError):
    """A user error of ``mmseg-config`` (bad folder, checkpoint or option).

    The command line prints its message and exits with code 2.
    """


@dataclass
class DataSummary:
    """What ``--data`` holds.

    Attributes:
        root: The absolute data folder.
        num_images: Images per split.
        img_suffix: File suffix of the images (e.g. ".jpg").
        seg_map_suffix: File suffix of the masks (e.g. ".png").
        class_names: One name per class id.
        class_source: Where the names come from (for the user).
    """

    root: Path
    num_images: dict[str, int]
    img_suffix: str
    seg_map_suffix: str
    class_names: list[str]
    class_source: str


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


def scan_data(root: str | os.PathLike[str]) -> DataSummary:
    """Checks the layout of ``--data`` and finds the suffixes and classes.

    Args:
        root: The data folder.

    Returns:
        The summary.

    Raises:
        MMSegConfigError: If a folder is missing, an image has no mask, the
            suffixes are mixed, a mask is not single-channel, or the classes do
            not fit the masks.
    """
    from lightly_cotap.data.segmentation_folder import SegmentationFolder

    root = Path(root).resolve()
    if not root.is_dir():
        raise MMSegConfigError(f"--data {str(root)!r} is not a folder.")
    num_images: dict[str, int] = {}
    img_suffixes: set[str] = set()
    mask_suffixes: set[str] = set()
    values: set[int] = set()
    for split in SPLITS:
        try:
            folder = SegmentationFolder(
                root / "images" / split, root / "masks" / split, image_size=None
            )
        except ValueError as ex:
            raise MMSegConfigError(
                f"--data {str(root)!r} needs images/{split} and masks/{split} with "
                f"one mask per image: {ex}"
            ) from ex
        num_images[split] = len(folder.samples)
        img_suffixes |= {image.suffix for image, _ in folder.samples}
        mask_suffixes |= {mask.suffix for _, mask in folder.samples}
        for _, mask in folder.samples:
            values |= _mask_values(mask)
    for kind, suffixes in (("images", img_suffixes), ("masks", mask_suffixes)):
        if len(suffixes) > 1:
            raise MMSegConfigError(
                f"the {kind} of --data have the suffixes {sorted(suffixes)}; mmseg "
                "reads one suffix per folder: convert them to one format."
            )
    values.discard(IGNORE_INDEX)
    names, source = _class_names(root, values)
    return DataSummary(
        root=root,
        num_images=num_images,
        img_suffix=img_suffixes.pop(),
        seg_map_suffix=mask_suffixes.pop(),
        class_names=names,
        class_source=source,
    )


def _mask_values(path: Path) -> set[int]:
    with Image.open(path) as mask:
        if mask.mode not in ("L", "P", "I", "I;16"):
            raise MMSegConfigError(
                f"mask {str(path)!r} is a {mask.mode} image; masks must be "
                "single-channel images of class ids (or palette PNGs)."
            )
        return {int(v) for v in np.unique(np.asarray(mask))}


def _class_names(root: Path, values: set[int]) -> tuple[list[str], str]:
    """Class names from ``classes.json``, else one per id up to the largest."""
    if not values:
        raise MMSegConfigError(
            f"every mask pixel of --data is {IGNORE_INDEX} (ignored): no classes."
        )
    path = root / "classes.json"
    if path.is_file():
        try:
            content = json.loads(path.read_text())
        except ValueError as ex:
            raise MMSegConfigError(f"{str(path)!r} is not valid JSON: {ex}") from ex
        names = content.get("class_names") if isinstance(content, dict) else content
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise MMSegConfigError(
                f"{str(path)!r} must hold a list of class names or "
                '{"class_names": [...]}.'
            )
        if max(values) >= len(names):
            raise MMSegConfigError(
                f"the masks hold class ids up to {max(values)} but {str(path)!r} "
                f"names {len(names)} classes."
            )
        return list(names), f"{path.name} ({len(names)} names)"
    num_classes = max(values) + 1
    if num_classes < 2:
        raise MMSegConfigError(
            "the masks of --data hold only class 0; segmentation needs at least 2."
        )
    names = [str(c) for c in range(num_classes)]
    return names, f"the mask values {_ranges(sorted(values))}"


def _ranges(values: list[int]) -> str:
    """'0-3, 7' for [0, 1, 2, 3, 7]."""
    parts: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


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
    from lightly_cotap.export import build_model_from_checkpoint
    from lightly_cotap.models.utils import load_checkpoint_file

    if not Path(path).is_file():
        raise MMSegConfigError(f"--checkpoint {str(path)!r} is not a file.")
    try:
        meta = load_checkpoint_file(path).get("meta")
        if isinstance(meta, Mapping) and "embed_dim" in meta:
            return dict(meta)
        return build_model_from_checkpoint(path).get_meta()
    except ValueError as ex:
        raise MMSegConfigError(
            f"--checkpoint {str(path)!r}: {ex}\nExport timm / DINO weights first: "
            "python -m lightly_cotap.export --checkpoint IN --arch NAME --output OUT"
        ) from ex


def level_indices(head: str, depth: int) -> list[int]:
    """Blocks whose outputs the head reads (the last one is the filtered level).

    The shipped ViT-S/B configs (depth 12) use block 7 for FCN's auxiliary head
    and blocks 3, 5, 7, 11 for UPerNet, i.e. a third, a half and two thirds of the
    depth; the same fractions for any depth (ViT-L, 24: 7, 11, 15, 23).

    Args:
        head: "linear", "fcn" or "upernet".
        depth: Number of blocks.

    Returns:
        Increasing block indices ending with ``depth - 1``.

    Raises:
        MMSegConfigError: If the ViT is too shallow for the head.
    """
    fractions = {"linear": (), "fcn": (2 / 3,), "upernet": (1 / 3, 1 / 2, 2 / 3)}
    indices = [round(depth * f) - 1 for f in fractions[head]] + [depth - 1]
    if indices[0] < 0 or any(b <= a for a, b in zip(indices, indices[1:])):
        raise MMSegConfigError(
            f"--head {head} reads {len(indices)} different blocks, but the "
            f"checkpoint's ViT has only {depth}; use --head linear."
        )
    return indices


def render_config(
    *,
    data: DataSummary,
    checkpoint: Path,
    meta: Mapping[str, Any],
    head: str,
    iters: int,
    crop: int,
    batch_size: int,
    workers: int,
    gpu: bool,
    configs_dir: Path,
) -> str:
    """The text of the config (see the module docstring).

    Args:
        data: Output of :func:`scan_data`.
        checkpoint: The backbone checkpoint (absolute path).
        meta: Its architecture (:func:`checkpoint_meta`).
        head: "linear", "fcn" or "upernet".
        iters: Training iterations.
        crop: Square crop size.
        batch_size: Images per GPU / per CPU run.
        workers: Data loader workers.
        gpu: Whether the config is for GPUs.
        configs_dir: The ``mmseg_configs`` folder to inherit from.

    Returns:
        Python source of an mmengine config.
    """
    from lightly_cotap.models.cotap_vit import GENERIC_ARCH, timm_overrides

    width = int(meta["embed_dim"])
    last = 2 * width if meta["use_filter"] else width
    depth = int(meta["depth"])
    size = "b16" if width >= 768 else "s16"
    model_base, schedule_base = (name.format(size=size) for name in HEADS[head])
    indices = level_indices(head, depth)
    timm_kwargs = timm_overrides(meta)
    arch = meta.get("arch") or GENERIC_ARCH
    trained = tuple(int(s) for s in meta["img_size"])
    patch = int(meta["patch_size"])
    interval = max(1, iters // 10)
    classes = _names_literal(data.class_names)
    stride = max(patch, (2 * crop // 3) // patch * patch)
    arch_note = arch + "".join(f", {k}={v!r}" for k, v in timm_kwargs.items())
    filter_note = (
        f"object-aware filter with {meta['num_prototypes']} prototypes"
        if meta["use_filter"]
        else "no filter"
    )
    lines = [
        f"# mmseg config written by `lightly-cotap mmseg-config --head {head}`.",
        f"#   data:       {data.root} ({data.num_images['train']} train / "
        f"{data.num_images['val']} val images)",
        f"#   classes:    {len(data.class_names)}, from {data.class_source}",
        f"#   checkpoint: {checkpoint}",
        f"#               {arch_note}; {filter_note}",
        f"#               position embedding trained at {trained[0]}x{trained[1]} px,"
        f" resampled to the {crop} px crop",
        f"#   machine:    {'GPU' if gpu else 'CPU'}; batch size {batch_size}"
        f"{' per GPU' if gpu else ''}; data workers: {workers}",
        f"#   schedule:   {iters} iterations; validation (mIoU on masks/val) and "
        f"checkpoints every {interval}",
        "# Train with mmseg's tools/train.py (in the mmseg package, .mim/tools):",
        '#   python $(python -c "import mmseg, os; print(os.path.dirname('
        'mmseg.__file__))")/.mim/tools/train.py THIS_FILE.py',
        "_base_ = [",
        f"    {_str(configs_dir / '_base_' / 'models' / model_base)},",
        f"    {_str(configs_dir / '_base_' / 'default_runtime.py')},",
        f"    {_str(configs_dir / '_base_' / 'schedules' / schedule_base)},",
        "]",
        "",
        "# -- data ----------------------------------------------------------------",
        f"crop_size = ({crop}, {crop})",
        f"data_root = {_str(data.root)}",
        f"metainfo = dict(classes={classes})",
        "train_pipeline = [",
        '    dict(type="LoadImageFromFile"),',
        '    dict(type="LoadAnnotations"),',
        "    dict(",
        '        type="RandomResize",',
        f"        scale=({4 * crop}, {crop}),",
        "        ratio_range=(0.5, 2.0),",
        "        keep_ratio=True,",
        "    ),",
        '    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=0.75),',
        '    dict(type="RandomFlip", prob=0.5),',
        '    dict(type="PhotoMetricDistortion"),',
        '    dict(type="PackSegInputs"),',
        "]",
        "test_pipeline = [",
        '    dict(type="LoadImageFromFile"),',
        f'    dict(type="Resize", scale=({4 * crop}, {crop}), keep_ratio=True),',
        "    # ground truth is loaded after Resize: metrics use the original labels",
        '    dict(type="LoadAnnotations"),',
        '    dict(type="PackSegInputs"),',
        "]",
        "train_dataloader = dict(",
        f"    batch_size={batch_size},",
        f"    num_workers={workers},",
        f"    persistent_workers={workers > 0},",
        '    sampler=dict(type="InfiniteSampler", shuffle=True),',
        *_dataset_lines(data, "train", "train_pipeline"),
        ")",
        "val_dataloader = dict(",
        "    batch_size=1,",
        f"    num_workers={workers},",
        f"    persistent_workers={workers > 0},",
        '    sampler=dict(type="DefaultSampler", shuffle=False),',
        *_dataset_lines(data, "val", "test_pipeline"),
        ")",
        "test_dataloader = val_dataloader",
        'val_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])',
        "test_evaluator = val_evaluator",
        "",
        "# -- model: the exported architecture -------------------------------------",
        "model = dict(",
        "    data_preprocessor=dict(size=crop_size),",
        "    backbone=dict(",
        f"        arch={_str(arch)},",
        "        img_size=crop_size,",
        "        timm_kwargs=dict("
        + ", ".join(f"{k}={v!r}" for k, v in timm_kwargs.items())
        + "),",
        f"        out_indices={tuple(indices)!r},",
        f"        use_filter={bool(meta['use_filter'])!r},",
        f"        num_prototypes={int(meta['num_prototypes'])},",
        f"        prototype_size={int(meta['prototype_size'])},",
        f'        init_cfg=dict(type="Pretrained", checkpoint={_str(checkpoint)}),',
        "    ),",
    ]
    num_classes = len(data.class_names)
    if head == "linear":
        lines.append(
            f"    decode_head=dict(in_channels={last}, channels={last}, "
            f"num_classes={num_classes}),"
        )
    elif head == "fcn":
        lines += [
            f"    decode_head=dict(in_channels={last}, num_classes={num_classes}),",
            f"    auxiliary_head=dict(in_channels={width}, num_classes={num_classes}),",
        ]
    else:
        lines += [
            f"    neck=dict(in_channels=[{width}, {width}, {width}, {last}], "
            f"out_channels={width}),",
            f"    decode_head=dict(in_channels=[{width}] * 4, "
            f"num_classes={num_classes}),",
            f"    auxiliary_head=dict(in_channels={width}, num_classes={num_classes}),",
        ]
    lines += [
        '    test_cfg=dict(mode="slide", crop_size=crop_size, '
        f"stride=({stride}, {stride})),",
        ")",
        "",
        "# -- schedule: everything follows max_iters --------------------------------",
        f"max_iters = {iters}",
        "train_cfg = dict(max_iters=max_iters, val_interval=max(1, max_iters // 10))",
        "default_hooks = dict(",
        "    logger=dict(interval=min(50, max(1, max_iters // 10))),",
        "    checkpoint=dict(interval=max(1, max_iters // 10)),",
        ")",
    ]
    if head != "linear":
        lines += [
            "# LinearLR reaches the base rate at its last iteration: at least 2",
            f"warmup_iters = max(2, min({WARMUP_ITERS}, max_iters // 10))",
            "param_scheduler = [",
            '    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, '
            "end=warmup_iters),",
            '    dict(type="PolyLR", eta_min=0.0, power=1.0, begin=warmup_iters, '
            "by_epoch=False),",
            "]",
        ]
    lines += [
        "",
        "# -- machine ---------------------------------------------------------------",
    ]
    if gpu:
        lines.append(
            "# batch_size is per GPU; several GPUs: torchrun --nproc_per_node=G "
            ".../train.py THIS_FILE.py --launcher pytorch"
        )
    else:
        lines.append(
            'env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo"))'
        )
    return "\n".join(lines) + "\n"


def _dataset_lines(data: DataSummary, split: str, pipeline: str) -> list[str]:
    """The ``dataset=dict(...)`` entry of a data loader."""
    return [
        "    dataset=dict(",
        '        type="BaseSegDataset",',
        "        data_root=data_root,",
        f'        data_prefix=dict(img_path="images/{split}", '
        f'seg_map_path="masks/{split}"),',
        f"        img_suffix={_str(data.img_suffix)},",
        f"        seg_map_suffix={_str(data.seg_map_suffix)},",
        "        metainfo=metainfo,",
        f"        pipeline={pipeline},",
        "    ),",
    ]


def _str(value: object) -> str:
    """A double-quoted Python string literal."""
    return json.dumps(str(value), ensure_ascii=False)


def _names_literal(names: Sequence[str]) -> str:
    """A tuple literal of class names, wrapped at about 80 characters."""
    lines: list[str] = []
    line = ""
    for item in (_str(n) + "," for n in names):
        if line and len(line) + len(item) > 68:
            lines.append(line)
            line = ""
        line = f"{line} {item}" if line else item
    lines.append(line)
    if len(lines) == 1:
        return f"({lines[0][:-1] if len(names) > 1 else lines[0]})"
    return "(\n" + "".join(f"        {line}\n" for line in lines) + "    )"


def configs_folder() -> Path:
    """The ``mmseg_configs`` folder of this source tree.

    Raises:
        MMSegConfigError: If the package is not installed from a source checkout.
    """
    folder = Path(__file__).resolve().parents[1] / "mmseg_configs"
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
    iters = DEFAULT_ITERS[args.head] if args.iters is None else args.iters
    if iters < 1:
        raise MMSegConfigError(f"--iters must be positive, got {iters}.")
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
    batch_size = args.batch_size or (
        GPU_BATCH_SIZE[args.head] if gpu else CPU_BATCH_SIZE
    )
    if batch_size < 1:
        raise MMSegConfigError(f"--batch-size must be positive, got {batch_size}.")
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
    import mmseg

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
    import torch

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
    import torch
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


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command on its own (``python -m lightly_cotap.mmseg_config``).

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Exit code 0 (2 on a user error, via SystemExit).
    """
    from lightly_cotap.cli import HelpFormatter

    parser = add_mmseg_config_arguments(
        argparse.ArgumentParser(
            prog="lightly-cotap mmseg-config",
            description="Write an mmseg config for a backbone and a data folder.",
            formatter_class=HelpFormatter,
        )
    )
    run_mmseg_config_command(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
