"""The text of the config that ``lightly-cotap mmseg-config`` writes."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightly_cotap.mmseg_config.data import DataSummary, MMSegConfigError
from lightly_cotap.models.cotap_vit_meta import GENERIC_ARCH, timm_overrides

#: Heads of ``--head`` -> the model base of ``mmseg_configs/_base_/models`` and
#: the schedule base of ``mmseg_configs/_base_/schedules``.
HEADS: dict[str, tuple[str, str]] = {
    "linear": ("linear_cotap-vit-{size}.py", "linear_20k.py"),
    "fcn": ("fcn_cotap-vit-{size}.py", "finetune_40k.py"),
    "upernet": ("upernet_cotap-vit-{size}.py", "finetune_40k.py"),
}
#: Warm-up of the fine-tuning schedules (iterations), at most a tenth of the run
#: (but 2, the shortest that reaches the base rate).
WARMUP_ITERS = 1500


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
    """The text of the config (see :mod:`lightly_cotap.mmseg_config`).

    Args:
        data: Output of :func:`~lightly_cotap.mmseg_config.data.scan_data`.
        checkpoint: The backbone checkpoint (absolute path).
        meta: Its architecture (a ``CoTAPVisionTransformer.get_meta`` dict).
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
        f"#               position embedding trained at {trained[0]}x{trained[1]} px"
        + (
            " (the crop size)"
            if trained == (crop, crop)
            else f", resampled by CoTAPViT for the {crop}x{crop} crop"
        ),
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
