"""Sizes and targets of the device check: one GPU, and the CPU smoke run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from train_step import PRESETS

ROOT = Path(__file__).resolve().parents[1]
FCN_CONFIG = ROOT / "mmseg_configs/fcn/fcn_cotap-vit-s16_4xb4-40k_voc12aug-512x512.py"
AUTO_TARGET = 1.10
STEP_TARGET = 1.3

#: timm arguments of the CPU smoke run's ViT (with "vit_tiny_patch16_224").
TINY_VIT = dict(patch_size=8, depth=2, embed_dim=48, num_heads=2)

#: Sizes of a run on one GPU and of the CPU smoke run.
SIZES: dict[str, dict[str, Any]] = {
    "gpu": dict(
        step_preset=dict(PRESETS["paper"]),
        loss_sizes=[2**k for k in range(10, 19)],  # 1k ... 256k
        loss_repeats=5,
        sync_batch=8,
        sync_fast_n=65536,
        batch_start=16,
        batch_max=2048,
        timed_steps=3,
        filter=dict(arch="vit_small_patch16_224", img_size=224, batch=128),
        mmseg=dict(img_size=512, batch=4, iters=10),
        dtype=torch.bfloat16,
    ),
    "cpu": dict(
        step_preset=dict(
            backbone="vit_tiny_patch16_224",
            backbone_kwargs=dict(img_size=32, **TINY_VIT),
            global_crop_size=32,
            local_crop_size=16,
            n_local_views=2,
            batch_size=2,
            pool_sizes=(2, 4),
            roi_output_size=2,
            module_kwargs=dict(
                head_hidden_dim=32,
                head_bottleneck_dim=16,
                patch_prototypes=16,
                cls_prototypes=24,
                num_prototypes=4,
            ),
            objective_kwargs=dict(
                patch_queue_size=64,
                patch_queue_update_size=16,
                cls_queue_size=16,
                cls_queue_update_size=4,
            ),
        ),
        loss_sizes=[64, 128, 256, 512, 1024],
        loss_repeats=1,
        sync_batch=2,
        sync_fast_n=512,
        batch_start=1,
        batch_max=4,
        timed_steps=1,
        filter=dict(
            arch="vit_tiny_patch16_224",
            img_size=32,
            batch=2,
            timm=TINY_VIT,
        ),
        mmseg=dict(img_size=64, batch=2, iters=2),
        dtype=torch.bfloat16,
    ),
}
