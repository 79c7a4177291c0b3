from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("mmseg")

from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import lightly_cotap.mmseg  # noqa: E402,F401
from lightly_cotap.export import export_backbone  # noqa: E402
from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer  # noqa: E402

CONFIG = (
    Path(__file__).resolve().parents[2]
    / "mmseg_configs/linear/linear_cotap-vit-s16_4xb8-20k_voc12aug-448x448.py"
)
CLASSES = ("dark", "medium", "bright")
CROP = (64, 64)
ITERS = 20


def _dataset(root: Path, split: str, pipeline: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(
        type="BaseSegDataset",
        data_root=str(root),
        data_prefix=dict(img_path=f"images/{split}", seg_map_path=f"masks/{split}"),
        img_suffix=".jpg",
        seg_map_suffix=".png",
        metainfo=dict(classes=CLASSES, palette=[[0, 0, 0], [128] * 3, [255] * 3]),
        pipeline=pipeline,
    )


@pytest.mark.slow
def test_linear_probe_runs_through_mmengine_runner(
    tmp_path: Path, brightness_segmentation: Path
) -> None:
    torch.manual_seed(0)
    # "pretrained" tiny CoTAP backbone, exported with the plugin
    plugin = CoTAPVisionTransformer(
        "vit_tiny_patch16_224",
        img_size=CROP,
        num_prototypes=8,
        depth=2,
        patch_size=8,
    )
    assert plugin.filter is not None
    plugin.filter.set_prototypes(torch.randn_like(plugin.filter.prototypes))
    checkpoint = tmp_path / "cotap_tiny.pth"
    export_backbone(plugin, checkpoint)

    # the shipped linear-probe config, scaled down: tiny ViT, 64 px, 20 iterations
    cfg = Config.fromfile(str(CONFIG))
    cfg.work_dir = str(tmp_path / "work")
    cfg.launcher = "none"
    cfg.randomness = dict(seed=0)
    cfg.model.data_preprocessor.size = CROP
    cfg.model.backbone.update(
        arch="vit_tiny_patch16_224",
        img_size=CROP,
        num_prototypes=8,
        timm_kwargs=dict(depth=2, patch_size=8),
        out_indices=(-1,),
    )
    cfg.model.backbone.init_cfg.checkpoint = str(checkpoint)
    cfg.model.decode_head.update(in_channels=384, channels=384, num_classes=3)
    cfg.model.test_cfg = dict(mode="slide", crop_size=CROP, stride=(43, 43))
    train_pipeline: list[dict[str, Any]] = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations"),
        dict(
            type="RandomResize",
            scale=(256, 64),
            ratio_range=(1.0, 1.5),
            keep_ratio=True,
        ),
        dict(type="RandomCrop", crop_size=CROP),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PackSegInputs"),
    ]
    test_pipeline: list[dict[str, Any]] = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=(256, 64), keep_ratio=True),
        dict(type="LoadAnnotations"),
        dict(type="PackSegInputs"),
    ]
    loader = dict(num_workers=0, persistent_workers=False)
    cfg.train_dataloader = dict(
        batch_size=4,
        sampler=dict(type="InfiniteSampler", shuffle=True),
        dataset=_dataset(brightness_segmentation, "train", train_pipeline),
        **loader,
    )
    cfg.val_dataloader = dict(
        batch_size=1,
        sampler=dict(type="DefaultSampler", shuffle=False),
        dataset=_dataset(brightness_segmentation, "val", test_pipeline),
        **loader,
    )
    cfg.test_dataloader = cfg.val_dataloader
    # the lr decay follows train_cfg.max_iters (the PolyLR has no `end`)
    cfg.train_cfg.update(max_iters=ITERS, val_interval=ITERS)
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint.interval = ITERS
    cfg.env_cfg.cudnn_benchmark = False

    runner = Runner.from_cfg(cfg)
    runner.train()

    losses = runner.message_hub.get_scalar("train/loss").data[0]
    assert len(losses) == ITERS and np.isfinite(losses).all()
    assert losses[-5:].mean() < losses[:5].mean()
    lrs = runner.message_hub.get_scalar("train/lr").data[0]
    assert lrs[0] == 3e-3 and lrs[-1] < 0.1 * lrs[0]

    # the backbone got the exported weights (init_cfg) and stayed frozen
    backbone = runner.model.backbone.model
    for key, value in plugin.state_dict().items():
        torch.testing.assert_close(backbone.state_dict()[key], value, rtol=0, atol=0)

    metrics = runner.test()
    assert set(metrics) >= {"mIoU", "aAcc"}
    assert math.isfinite(metrics["mIoU"]) and 0.0 <= metrics["mIoU"] <= 100.0
