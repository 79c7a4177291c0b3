"""Settings of the dense-quality benchmark: presets, rows, metrics, gate, inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGE2_METHODS = (
    "a_dino",
    "b_cotap",
    "c_cotap_no_rank",
    "d_densecl",
    "e_cotap_no_filter",
    "b_cotap_label_pairs",
)
DEFAULT_METHODS = STAGE2_METHODS[:5]
STAGE1_LABELS = {
    "dino": "P (stage 1: DINO from scratch, object-centric images)",
    "supervised": "P (stage 1: supervised object class, stand-in for ImageNet "
    "pretraining)",
    "checkpoint": "P (stage 1: loaded checkpoint)",
}
LABELS = {
    "R": "random initialisation (no training)",
    "a_dino": "(a) + DINO",
    "b_cotap": "(b) + CoTAP (full)",
    "c_cotap_no_rank": "(c) + CoTAP w/o ranking loss",
    "d_densecl": "(d) + DenseCL (Lightly)",
    "e_cotap_no_filter": "(e) + CoTAP w/o object-aware filter",
    "b_cotap_label_pairs": "(b') + CoTAP, positives share an object class (labels)",
}
#: Minimum mean margin of P over the random initialisation (mIoU points).
GATE = {"objectness": 10.0, "linear_probe": 5.0}
METRICS = ("linear_probe", "kmeans", "retrieval", "objectness")
METRIC_NAMES = {
    "linear_probe": "linear probe",
    "kmeans": "k-means",
    "retrieval": "retrieval",
    "objectness": "object / background probe",
}


@dataclass
class Config:
    """Sizes of one benchmark run."""

    arch: str = "vit_tiny_patch16_224"
    depth: int = 4
    patch_size: int = 8
    conv_stem: bool = True
    scene_size: int = 96
    global_crop: int = 64
    local_crop: int = 32
    n_local: int = 2
    num_train: int = 384
    num_probe: int = 96
    num_test: int = 96
    stage1: str = "supervised"
    stage1_steps: int = 1000
    stage1_images: int = 8000
    stage1_image_size: int = 64
    stage1_batch_size: int = 64
    stage1_lr: float = 1e-3
    steps: int = 50
    batch_size: int = 16
    lr: float = 5e-4
    stage2_lr: float = 1e-4
    probe_steps: int = 300
    label_size: int = 48
    memory_size: int = 20_000
    num_neighbors: int = 5
    device: str = "cpu"


PRESETS = {
    "cpu": Config(),
    "quick": Config(
        num_train=48,
        num_probe=16,
        num_test=16,
        stage1_steps=4,
        stage1_images=64,
        stage1_batch_size=16,
        steps=2,
        batch_size=8,
        probe_steps=20,
        label_size=24,
        memory_size=2000,
    ),
    # One GPU, sized by estimate for <= 8 minutes: ViT-S width, 8 blocks, 128 px
    # scenes (16 x 16 patches of 8 px at the 128 px global crops).
    "gpu": Config(
        arch="vit_small_patch16_224",
        depth=8,
        patch_size=8,
        scene_size=160,
        global_crop=128,
        local_crop=64,
        num_train=2048,
        num_probe=256,
        num_test=256,
        stage1_steps=3000,
        stage1_images=30000,
        stage1_image_size=128,
        stage1_batch_size=128,
        steps=300,
        batch_size=64,
        probe_steps=1000,
        label_size=80,
        memory_size=100_000,
        device="cuda",
    ),
}


#: Stage-2 models whose features the PCA figure shows next to P's.
PCA_METHODS = ("a_dino", "b_cotap")


@dataclass
class Paths:
    """Input folders: evaluation cut-outs, background photos, stage-1 object pool."""

    objects: Path
    backgrounds: Path
    stage1_objects: Path | None = None
