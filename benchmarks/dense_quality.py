"""Dense-feature quality of CoTAP post-training on real copy-paste scenes.

Mirrors the paper's protocol [0] (CoTAP continues an image-level checkpoint trained on
object-centric images, then trains on scene-centric images), at a scale that runs on a
2-core CPU:

- stage 1 on **object-centric** images (one train-split cut-out per image, centred and
  large, on a :class:`~lightly_cotap.data.background_views.BackgroundView`: procedural
  textures or strongly augmented photo crops, so no background repeats recognisably):
  a tiny ViT (timm ``vit_tiny``, depth 4, patch 8, with a convolutional stem:
  :class:`~lightly_cotap.models.modules.conv_stem.ConvStem`, which learns from scratch
  several times faster than a patchify projection at this scale) is trained from
  random initialisation -> checkpoint P (``--stage1-steps``). ``--stage1 dino`` is the
  self-supervised objective (Lightly's ``DINOProjectionHead`` + ``DINOLoss``, EMA
  teacher, multi-crop); ``--stage1 supervised`` (the default) trains on the image's
  object class and stands in for the supervised / ImageNet-scale pretraining that
  cannot be run from scratch on a CPU; every table names which one was used.
  ``--stage1-checkpoint FILE`` skips the training and starts every seed from FILE.
  ``--stage1-objects DIR`` trains stage 1 on a larger object pool instead of the
  train-split cut-outs (``stage1_objects`` of ``prepare_copy_paste_scenes.py``: every
  Tux Paint stamp with an alpha channel except the test cut-outs and their variants,
  labelled by stamp folder); ``--stage1-only`` stops after stage 1 and the gate;
- a gate: P's patch features must beat the random initialisation by at least
  ``GATE`` points on the object / background probe and on linear-probe mIoU (mean over
  seeds). Stage 2 only means something above the gate; the report says which side
  every seed's P is on;
- stage 2 on **scenes** (1-3 objects per image, the same augmented backgrounds)
  continues from P for the same, smaller number of steps (``--steps``; CoTAP is a
  short continued training) with
  (a) the DINO objective only,
  (b) the full CoTAP objective (:class:`~lightly_cotap.train.cotap_module.CoTAPModule`:
      CoTAP ranking + patch cluster + CLS terms + object-aware filter, positives
      from a :class:`~lightly_cotap.data.NeighborIndex` of P's CLS embeddings through
      :class:`~lightly_cotap.data.SemanticPairDataset`),
  (c) the same without the ranking loss (``cotap_weight=0``),
  (d) DenseCL built from Lightly's components (``DenseCLProjectionHead``,
      ``NTXentLoss`` with memory banks, ``select_most_similar``, EMA key encoder),
  (e) the full CoTAP objective without the object-aware filter,
  (b') a diagnostic: (b) with positives that share the scene's largest object class
      (from the labels, ``SemanticPairDataset(labels=...)``) instead of P's
      neighbours;
- the random initialisation, P and every stage-2 model are evaluated with
  :func:`~lightly_cotap.eval.evaluate_dense` on disjoint test scenes (unseen objects
  and unseen background photos): linear-probe (BatchNorm + 1x1 conv), k-means
  (K = classes, Hungarian) and retrieval mIoU, and a class-agnostic object /
  background linear probe; mean and standard deviation over seeds, and the per-seed
  linear-probe differences of (b) against the others;
- diagnostics: how often P's neighbours share the background photo or an object class
  (against chance), and CoTAP's loss terms over the last quarter of its steps.

All stage-2 runs share the crops (:class:`~lightly_cotap.transforms.CoTAPTransform`),
the optimiser (AdamW, cosine learning rate) and the number of steps. Every (seed,
stage) is one task on a pool of ``--jobs`` single-threaded processes (on 2 cores, two
one-thread processes do more work than one two-thread process).

Measured cost on the shared 2-core machine (batch 16, 64 px crops, one thread per
process, two processes): about 1.6 s per DINO step, 4-5 s per CoTAP step (two images
per item, teacher + student, five loss terms), 0.5 s per DenseCL step and 15-30 s per
evaluation. Usage::

    python benchmarks/dense_quality.py                  # 3 seeds, <= 60 min on 2 cores
    python benchmarks/dense_quality.py --quick          # smoke run, ~1 min
    python benchmarks/dense_quality.py --preset gpu     # larger ViT / images, one GPU
    python benchmarks/dense_quality.py --stage1-checkpoint out/stage1/seed0.pth

The object cut-outs and backgrounds come from
``benchmarks/prepare_copy_paste_scenes.py`` (``--objects`` / ``--backgrounds``
default to its cache folders). The table is printed and written to ``--out`` with
``results.json`` (per row and seed every metric, the gate and its verdict, the
settings), the stage-1 checkpoints (``stage1/seed<N>.pth``) and ``pca.png`` (PCA of
the dense features of P, (a) and (b) on test scenes).

- [0]: Wen et al., Semantic Concentration for Self-Supervised Dense Representations
  Learning, 2025, https://arxiv.org/abs/2509.09429
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss, NTXentLoss
from lightly.models.modules.heads import DenseCLProjectionHead, DINOProjectionHead
from lightly.models.utils import (
    deactivate_requires_grad,
    select_most_similar,
    update_momentum,
)
from lightly.transforms.utils import IMAGENET_NORMALIZE
from lightly.utils.scheduler import cosine_schedule
from lr_schedule import set_lr
from pytorch_lightning import seed_everything
from pytorch_lightning.utilities import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lightly_cotap.atomic_write import save_torch, write_text
from lightly_cotap.data import CopyPasteScenes, NeighborIndex, SemanticPairDataset
from lightly_cotap.data.copy_paste_scenes import Split
from lightly_cotap.eval import dense_feature_fn, evaluate_dense
from lightly_cotap.eval.visualize import pca_rgb, save_image_grid, to_uint8_images
from lightly_cotap.export import export_state_dict
from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer
from lightly_cotap.transforms import CoTAPTransform

CACHE = Path.home() / ".cache/lightly_cotap/debian"
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


# -- data ---------------------------------------------------------------------------


class SceneImages(Dataset[Any]):
    """Rendered scene images (PIL), kept in memory; optional transform."""

    def __init__(
        self, images: list[Any], transform: Callable[[Any], Any] | None = None
    ) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Any:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), index


def make_scenes(
    objects: Path, backgrounds: Path, cfg: Config, seed: int
) -> tuple[CopyPasteScenes, list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
    """Training scenes, labelled probe scenes (train split) and test scenes.

    The training scenes have augmented backgrounds (as the stage-1 images); the probe
    and test scenes are plain crops of the photos of their split.
    """
    common: dict[str, Any] = dict(image_size=cfg.scene_size, max_background_side=512)
    train = CopyPasteScenes(
        objects,
        backgrounds,
        split="train",
        num_samples=cfg.num_train,
        seed=seed,
        augment_backgrounds=True,
        **common,
    )
    probe = CopyPasteScenes(
        objects,
        backgrounds,
        split="train",
        num_samples=cfg.num_probe,
        seed=seed + 1000,
        **common,
    )
    test = CopyPasteScenes(
        objects,
        backgrounds,
        split="test",
        num_samples=cfg.num_test,
        seed=seed + 2000,
        **common,
    )
    return (
        train,
        [probe[i] for i in range(len(probe))],
        [test[i] for i in range(len(test))],
    )


def object_centric_scenes(
    objects: Path,
    backgrounds: Path,
    *,
    split: Split,
    num_samples: int,
    image_size: int,
    seed: int,
    object_split: Split | None = None,
) -> CopyPasteScenes:
    """The stage-1 image recipe: one centred, large cut-out on a random background."""
    return CopyPasteScenes(
        objects,
        backgrounds,
        split=split,
        object_split=object_split,
        num_samples=num_samples,
        image_size=image_size,
        num_objects=(1, 1),
        object_scale=(0.55, 0.85),
        center_jitter=0.1,
        augment_backgrounds=True,
        seed=seed,
        max_background_side=512,
    )


def object_centric_images(
    paths: Paths, cfg: Config, seed: int, size: int
) -> tuple[list[Any], list[int]]:
    """Stage-1 images (:func:`object_centric_scenes`) on train-split backgrounds.

    The cut-outs are the train split of ``paths.objects`` or, when set, every
    cut-out of ``paths.stage1_objects`` (a pool without the test objects, with its
    own classes).

    Returns:
        The PIL images and their object classes (0-based).
    """
    pool = paths.stage1_objects
    images = object_centric_scenes(
        paths.objects if pool is None else pool,
        paths.backgrounds,
        split="train",
        object_split=None if pool is None else "all",
        num_samples=cfg.stage1_images,
        image_size=size,
        seed=seed + 3000,
    )
    layouts = [images.layout(i) for i in range(len(images))]
    return (
        [images.render(layout)[0] for layout in layouts],
        [layout.objects[0].class_id - 1 for layout in layouts],
    )


def transform(cfg: Config) -> CoTAPTransform:
    return CoTAPTransform(
        global_crop_size=cfg.global_crop,
        local_crop_size=cfg.local_crop,
        n_local_views=cfg.n_local,
        global_crop_scale=(0.25, 1.0),
        local_crop_scale=(0.05, 0.25),
    )


def view_loader(images: SceneImages, cfg: Config) -> DataLoader[Any]:
    """Shuffled batches of the CoTAP crops of the scenes (single-image methods)."""
    return DataLoader(
        SceneImages(images.images, transform(cfg)),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
    )


def loop(loader: DataLoader[Any], steps: int) -> Iterator[Any]:
    done = 0
    while True:
        for batch in loader:
            if done == steps:
                return
            yield batch
            done += 1


def backbone(cfg: Config, use_filter: bool, **kwargs: Any) -> CoTAPVisionTransformer:
    return CoTAPVisionTransformer(
        cfg.arch,
        use_filter=use_filter,
        conv_stem=cfg.conv_stem,
        depth=cfg.depth,
        patch_size=cfg.patch_size,
        img_size=cfg.global_crop,
        **kwargs,
    )


def optimizer(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.04)


# -- objectives -----------------------------------------------------------------------


def train_dino(
    model: CoTAPVisionTransformer,
    images: SceneImages,
    cfg: Config,
    lr: float,
    seed: int,
    steps: int,
) -> CoTAPVisionTransformer:
    """DINO-style image-level training (Lightly's DINO head and loss) of ``model``."""
    seed_everything(seed, verbose=False)

    def make_head() -> DINOProjectionHead:
        return DINOProjectionHead(model.out_dim, 256, 64, 1024, freeze_last_layer=1)

    head = make_head()
    student = nn.ModuleDict({"backbone": model, "head": head})
    # Lightly's DINO head uses torch weight_norm, which deepcopy does not support.
    teacher = nn.ModuleDict({"backbone": copy.deepcopy(model), "head": make_head()})
    teacher["head"].load_state_dict(head.state_dict())
    deactivate_requires_grad(teacher)
    student.to(cfg.device)
    teacher.to(cfg.device)
    criterion = DINOLoss(output_dim=1024, warmup_teacher_temp_epochs=0).to(cfg.device)
    loader = view_loader(images, cfg)
    opt = optimizer(list(student.parameters()), lr)
    student.train()
    for step, (views, _) in enumerate(loop(loader, steps)):
        views = move_data_to_device(views, cfg.device)
        set_lr(opt, step, steps, lr)
        update_momentum(student, teacher, cosine_schedule(step, steps, 0.99, 1.0))
        with torch.no_grad():
            t_out = [
                teacher["head"](teacher["backbone"](v).cls) for v in views["teacher"]
            ]
        s_out = [student["head"](student["backbone"](v).cls) for v in views["student"]]
        loss = criterion(t_out, s_out, epoch=0)
        opt.zero_grad()
        loss.backward()
        head.cancel_last_layer_gradients(current_epoch=0)
        opt.step()
    return model.eval()


def train_supervised(
    model: CoTAPVisionTransformer,
    images: list[Any],
    labels: list[int],
    cfg: Config,
    seed: int,
) -> CoTAPVisionTransformer:
    """Supervised stage 1: object class of the object-centric images.

    A linear classifier reads the mean of the patch features (global average
    pooling), so the class evidence has to be carried by the patch features that the
    dense evaluation reads, not only by the CLS token. Cross-entropy with label
    smoothing 0.1, random horizontal flips, AdamW with warm-up and cosine decay.
    """
    seed_everything(seed, verbose=False)
    x = torch.stack([torch.from_numpy(np.asarray(im).copy()) for im in images])
    x = x.permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S) uint8
    y = torch.tensor(labels)
    mean = torch.tensor(IMAGENET_NORMALIZE["mean"], device=cfg.device)[:, None, None]
    std = torch.tensor(IMAGENET_NORMALIZE["std"], device=cfg.device)[:, None, None]
    head = nn.Linear(model.out_dim, int(y.max()) + 1)
    net = nn.ModuleDict({"backbone": model, "head": head}).to(cfg.device).train()
    opt = optimizer(list(net.parameters()), cfg.stage1_lr)
    generator = torch.Generator().manual_seed(seed)
    for step in range(cfg.stage1_steps):
        set_lr(opt, step, cfg.stage1_steps, cfg.stage1_lr)
        index = torch.randint(len(x), (cfg.stage1_batch_size,), generator=generator)
        batch = x[index].to(cfg.device).float().div(255)
        flip = torch.rand(len(batch), generator=generator) < 0.5
        flip = flip.to(cfg.device)[:, None, None, None]
        batch = torch.where(flip, batch.flip(3), batch)  # no boolean indexing (sync)
        logits = head(model((batch - mean) / std).dense.mean((1, 2)))
        loss = F.cross_entropy(logits, y[index].to(cfg.device), label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train_densecl(
    model: CoTAPVisionTransformer,
    images: SceneImages,
    cfg: Config,
    lr: float,
    seed: int,
    steps: int,
) -> CoTAPVisionTransformer:
    """DenseCL [Wang et al., 2021] from Lightly's components (as Lightly's example)."""
    seed_everything(seed, verbose=False)
    dim = model.out_dim
    student = nn.ModuleDict(
        {
            "backbone": model,
            "global": DenseCLProjectionHead(dim, dim, 64),
            "local": DenseCLProjectionHead(dim, dim, 64),
        }
    )
    student.to(cfg.device)
    teacher = copy.deepcopy(student)
    deactivate_requires_grad(teacher)
    global_loss = NTXentLoss(temperature=0.2, memory_bank_size=(2048, 64))
    local_loss = NTXentLoss(temperature=0.2, memory_bank_size=(2048, 64))
    global_loss.to(cfg.device)
    local_loss.to(cfg.device)
    loader = view_loader(images, cfg)
    opt = optimizer(list(student.parameters()), lr)

    def embed(net: nn.ModuleDict, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dense = net["backbone"](x).dense.flatten(1, 2)  # (B, hw, C)
        return dense, net["global"](dense.mean(1)), net["local"](dense)

    for step, (views, _) in enumerate(loop(loader, steps)):
        views = move_data_to_device(views, cfg.device)
        set_lr(opt, step, steps, lr)
        update_momentum(student, teacher, cosine_schedule(step, steps, 0.99, 1.0))
        x0, x1 = views["student"][0], views["student"][1]
        q_dense, q_global, q_local = embed(student, x0)
        with torch.no_grad():
            k_dense, k_global, k_local = embed(teacher, x1)
            k_local = select_most_similar(q_dense, k_dense, k_local)
        loss = 0.5 * global_loss(q_global, k_global) + 0.5 * local_loss(
            q_local.flatten(0, 1), k_local.flatten(0, 1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train_cotap(
    p_state: dict[str, Any],
    pairs: SemanticPairDataset,
    cfg: Config,
    lr: float,
    seed: int,
    cotap_weight: float,
    use_filter: bool = True,
) -> tuple[CoTAPVisionTransformer, dict[str, float]]:
    """CoTAP post-training from P with the recipe's LightningModule (manual loop).

    Returns:
        The trained backbone and the mean of every loss term over the last
        quarter of the steps.
    """
    from lightly_cotap.train.cotap_module import CoTAPModule

    seed_everything(seed, verbose=False)
    grid = cfg.global_crop // cfg.patch_size
    module = CoTAPModule(
        cfg.arch,
        backbone_kwargs=dict(
            depth=cfg.depth,
            patch_size=cfg.patch_size,
            img_size=cfg.global_crop,
            conv_stem=cfg.conv_stem,
        ),
        use_filter=use_filter,
        num_prototypes=16,
        head_hidden_dim=256,
        head_bottleneck_dim=64,
        patch_prototypes=64,
        cls_prototypes=256,
        objective_kwargs=dict(
            cotap_weight=cotap_weight,
            pool_sizes=(grid // 2, grid),
            roi_output_size=grid // 2,
            patch_queue_size=4096,
            patch_queue_update_size=256,
            cls_queue_size=1024,
            cls_queue_update_size=cfg.batch_size,
        ),
        prototype_bank_size=256,
        prototype_bank_update=cfg.batch_size,
        kmeans_iters=50,
        max_steps=cfg.steps,
    )
    module.load_backbone_weights(p_state)
    module.to(cfg.device)
    loader = DataLoader(pairs, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    student = module.student
    head_params = [
        p for n, p in student.named_parameters() if not n.startswith("backbone.")
    ]
    opt = optimizer(list(student.backbone.parameters()), lr)
    opt.add_param_group({"params": head_params, "lr": lr, "lr_scale": 10.0})
    opt.param_groups[0]["lr_scale"] = 1.0
    module.train()
    history: dict[str, list[float]] = {}
    for step, batch in enumerate(loop(loader, cfg.steps)):
        batch = move_data_to_device(batch, cfg.device)
        set_lr(opt, step, cfg.steps, lr)
        update_momentum(
            student, module.teacher, cosine_schedule(step, cfg.steps, 0.99, 1.0)
        )
        module.teacher.eval()
        total, terms = module.compute_losses(batch)
        opt.zero_grad()
        total.backward()
        opt.step()
        if step >= cfg.steps - max(1, cfg.steps // 4):
            for name, value in terms.items():
                history.setdefault(name, []).append(float(value.detach()))
    return module.backbone.eval(), {
        name: statistics.mean(values) for name, values in history.items()
    }


# -- stages ---------------------------------------------------------------------------


@dataclass
class SeedData:
    """The scenes of one seed (rendered once per task; deterministic in the seed)."""

    images: SceneImages
    image_labels: list[int]
    layouts: list[Any]
    probe: list[tuple[Tensor, Tensor]]
    test: list[tuple[Tensor, Tensor]]
    num_classes: int


def seed_data(objects: Path, backgrounds: Path, cfg: Config, seed: int) -> SeedData:
    train, probe, test = make_scenes(objects, backgrounds, cfg, seed)
    samples = [train.sample(i) for i in range(len(train))]
    return SeedData(
        images=SceneImages([image for image, _ in samples]),
        image_labels=[dominant_object_class(mask) for _, mask in samples],
        layouts=[train.layout(i) for i in range(len(train))],
        probe=probe,
        test=test,
        num_classes=train.num_classes,
    )


def dominant_object_class(mask: Any) -> int:
    """Class of the largest visible object of a scene mask (0 if none is visible)."""
    counts = torch.bincount(torch.as_tensor(mask).flatten().long(), minlength=256)
    counts[0] = counts[255] = 0
    return int(counts.argmax())


def build_neighbors(
    p_state: dict[str, Any], images: SceneImages, cfg: Config
) -> NeighborIndex:
    """kNN positives from P's CLS embeddings of the (center-resized) scenes."""
    from lightly_cotap.data.segmentation_folder import image_to_tensor

    model = CoTAPVisionTransformer.from_checkpoint(p_state).to(cfg.device).eval()
    with torch.no_grad():
        x = torch.stack(
            [
                image_to_tensor(im.resize((cfg.global_crop, cfg.global_crop)))
                for im in images.images
            ]
        )
        emb = torch.cat([model(b.to(cfg.device)).cls.cpu() for b in x.split(64)])
    return NeighborIndex.from_embeddings(emb, k=cfg.num_neighbors)


def neighbor_agreement(
    neighbors: NeighborIndex, layouts: list[Any]
) -> dict[str, float]:
    """How often a positive shares the background photo / an object class.

    Chance levels are over all ordered pairs of different scenes.
    """

    def shares(i: int, j: int) -> tuple[bool, bool]:
        a, b = layouts[i], layouts[j]
        same_background = a.background == b.background
        classes = {o.class_id for o in a.objects} & {o.class_id for o in b.objects}
        return same_background, bool(classes)

    pairs = [(i, int(j)) for i in range(len(layouts)) for j in neighbors.neighbors[i]]
    others = [
        (i, j) for i in range(len(layouts)) for j in range(len(layouts)) if i != j
    ]
    result = {}
    for name, chosen in (("neighbors", pairs), ("chance", others)):
        flags = [shares(i, j) for i, j in chosen]
        result[f"{name}_same_background"] = statistics.mean(f[0] for f in flags)
        result[f"{name}_shared_class"] = statistics.mean(f[1] for f in flags)
    return result


@torch.no_grad()
def foreground_agreement(
    model: CoTAPVisionTransformer, samples: list[tuple[Tensor, Tensor]], patch: int
) -> dict[str, float]:
    """How well the teacher-style foreground mask (CLS attention) finds the objects.

    A patch is an object patch when most of its labelled pixels are objects.

    Returns:
        ``object_rate`` (share of object patches), ``precision`` (share of object
        patches among the masked ones) and ``recall`` (share of object patches that
        are masked); an uninformative mask has precision == object_rate.
    """
    images = torch.stack([image for image, _ in samples])
    masks = torch.stack([mask for _, mask in samples]).float()[:, None]
    device = next(model.parameters()).device
    fg = torch.cat(
        [
            model(b.to(device), return_fg_mask=True).fg_mask.cpu()
            for b in images.split(32)
        ]
    )
    valid = F.avg_pool2d((masks != 255).float(), patch)
    objects = F.avg_pool2d(((masks > 0) & (masks != 255)).float(), patch)
    is_object = (objects > 0.5 * valid)[:, 0]
    fg = fg.reshape(is_object.shape)
    return {
        "object_rate": float(is_object.float().mean()),
        "precision": float(is_object[fg].float().mean()),
        "recall": float(fg[is_object].float().mean()),
    }


def evaluate(
    model: CoTAPVisionTransformer, data: SeedData, cfg: Config, seed: int
) -> dict[str, float]:
    common: dict[str, Any] = dict(
        label_size=cfg.label_size,
        batch_size=32,
        module=model,
        device=cfg.device,
        seed=seed,
        linear_probe={"steps": cfg.probe_steps},
        overclustering_k=0,
        progress=False,
    )
    result = evaluate_dense(
        dense_feature_fn(model),
        data.probe,
        data.test,
        data.num_classes,
        kmeans={"n_init": 3},
        retrieval={"memory_size": cfg.memory_size},
        **common,
    )
    scores = {name: float(result[name]["miou"]) for name in METRICS[:3]}
    # Class-agnostic diagnostic: does a linear probe find the objects at all?
    objectness = evaluate_dense(
        dense_feature_fn(model),
        object_masks(data.probe),
        object_masks(data.test),
        2,
        kmeans={"skip": True},
        retrieval={"skip": True},
        **common,
    )
    scores["objectness"] = float(objectness["linear_probe"]["miou"])
    return scores


def object_masks(samples: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """The same images with masks 1 = any object, 0 = background (255 kept)."""
    return [
        (image, torch.where(mask == 255, mask, (mask > 0).to(mask.dtype)))
        for image, mask in samples
    ]


#: Stage-2 models whose features the PCA figure shows next to P's.
PCA_METHODS = ("a_dino", "b_cotap")


@dataclass
class Paths:
    """Input folders: evaluation cut-outs, background photos, stage-1 object pool."""

    objects: Path
    backgrounds: Path
    stage1_objects: Path | None = None


def stage1_task(
    paths: Paths, cfg: Config, seed: int, checkpoint: Path | None, out: Path
) -> tuple[dict[str, Any], NeighborIndex, dict[str, Any]]:
    """Stage 1 from random initialisation (or ``checkpoint``) -> P and its report.

    P is trained on object-centric images with ``cfg.stage1`` and saved to
    ``out/stage1/seed<seed>.pth`` (the format ``--stage1-checkpoint`` reads).

    Returns P, P's neighbour index (the positives of the CoTAP runs) and the report:
    the scores of the random initialisation and of P, and how P's neighbours and
    attention mask agree with the layouts.
    """
    start = time.perf_counter()
    data = seed_data(paths.objects, paths.backgrounds, cfg, seed)
    seed_everything(seed, verbose=False)
    model = backbone(cfg, use_filter=False).to(cfg.device)
    init_scores = evaluate(model.eval(), data, cfg, seed)
    if checkpoint is not None:
        p_state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model = CoTAPVisionTransformer.from_checkpoint(p_state).to(cfg.device)
    else:
        if cfg.stage1 == "supervised":
            images, labels = object_centric_images(
                paths, cfg, seed, cfg.stage1_image_size
            )
            model = train_supervised(model, images, labels, cfg, seed)
        else:
            images, _ = object_centric_images(paths, cfg, seed, cfg.scene_size)
            model = train_dino(
                model, SceneImages(images), cfg, cfg.lr, seed, cfg.stage1_steps
            )
        p_state = export_state_dict(model)
        save_torch(p_state, out / "stage1" / f"seed{seed}.pth")
    model.eval()
    neighbors = build_neighbors(p_state, data.images, cfg)
    report = {
        "init_scores": init_scores,
        "scores": evaluate(model, data, cfg, seed),
        "neighbors": neighbor_agreement(neighbors, data.layouts),
        "foreground_mask": foreground_agreement(model, data.test, cfg.patch_size),
        "seconds": time.perf_counter() - start,
    }
    return p_state, neighbors, report


def stage2_task(
    paths: Paths,
    cfg: Config,
    seed: int,
    method: str,
    p_state: dict[str, Any],
    neighbors: NeighborIndex,
    out: Path,
    save_model: bool,
) -> dict[str, Any]:
    """Stage 2: continues from P with one of the methods, then evaluates.

    The scenes are rendered again here (a few seconds; deterministic in the seed)
    rather than sent to the worker process.
    """
    start = time.perf_counter()
    data = seed_data(paths.objects, paths.backgrounds, cfg, seed)
    lr = cfg.stage2_lr
    terms: dict[str, float] = {}
    if method in ("a_dino", "d_densecl"):
        train = train_dino if method == "a_dino" else train_densecl
        model = train(
            CoTAPVisionTransformer.from_checkpoint(p_state).to(cfg.device).train(),
            data.images,
            cfg,
            lr,
            seed,
            cfg.steps,
        )
    else:
        positives: dict[str, Any] = (
            {"labels": data.image_labels}
            if method == "b_cotap_label_pairs"
            else {"neighbors": neighbors}
        )
        pairs = SemanticPairDataset(
            data.images, transform=transform(cfg), seed=seed, **positives
        )
        weight = 0.0 if method == "c_cotap_no_rank" else 1.0
        model, terms = train_cotap(
            p_state,
            pairs,
            cfg,
            lr,
            seed,
            cotap_weight=weight,
            use_filter=method != "e_cotap_no_filter",
        )
    if save_model and method in PCA_METHODS:
        save_torch(
            export_state_dict(model), out / "models" / f"seed{seed}_{method}.pth"
        )
    return {
        "scores": evaluate(model, data, cfg, seed),
        "loss_terms": terms,
        "seconds": time.perf_counter() - start,
    }


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)


def run(
    paths: Paths,
    cfg: Config,
    seeds: list[int],
    methods: list[str],
    jobs: int,
    checkpoint: Path | None,
    out: Path,
) -> dict[int, dict[str, Any]]:
    """Runs every (seed, stage) task on ``jobs`` single-threaded worker processes.

    A seed's stage-2 tasks are queued as soon as its checkpoint P exists, so the
    workers stay busy. Returns ``{seed: {"P": report, method: report, ...}}``.
    """
    results: dict[int, dict[str, Any]] = {seed: {} for seed in seeds}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_init_worker, initargs=(1,)
    ) as pool:
        pending: dict[Future[Any], tuple[int, str]] = {
            pool.submit(stage1_task, paths, cfg, seed, checkpoint, out): (seed, "P")
            for seed in seeds
        }
        total = len(seeds) * (1 + len(methods))
        with tqdm(total=total, desc="dense quality", unit="run") as bar:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    seed, method = pending.pop(future)
                    if method == "P":
                        p_state, neighbors, report = future.result()
                        results[seed]["R"] = {"scores": report["init_scores"]}
                        # CoTAP runs first: the slowest tasks should not be last.
                        for name in sorted(methods, key=lambda m: "cotap" not in m):
                            task = pool.submit(
                                stage2_task,
                                paths,
                                cfg,
                                seed,
                                name,
                                p_state,
                                neighbors,
                                out,
                                seed == seeds[0],
                            )
                            pending[task] = (seed, name)
                    else:
                        report = future.result()
                    results[seed][method] = report
                    bar.update()
                    tqdm.write(
                        f"[seed {seed}] {method}: "
                        + ", ".join(
                            f"{k} {100 * v:.1f}" for k, v in report["scores"].items()
                        )
                        + f" ({report['seconds']:.0f}s)"
                    )
    return results


def per_seed_scores(
    results: dict[int, dict[str, Any]], rows: list[str]
) -> dict[str, dict[str, list[float]]]:
    """``{row: {metric: [per-seed mIoU in percent]}}``."""
    return {
        row: {
            metric: [100 * r[row]["scores"][metric] for r in results.values()]
            for metric in METRICS
        }
        for row in rows
    }


def gate(results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """P's margins over the random initialisation and the verdict.

    Returns:
        ``margins`` ({metric: [per-seed points]}), ``mean_margins``, ``required``
        (:data:`GATE`), ``per_seed_passed`` and ``passed`` (mean margins >= GATE).
    """
    margins = {
        metric: [
            100 * (r["P"]["scores"][metric] - r["R"]["scores"][metric])
            for r in results.values()
        ]
        for metric in GATE
    }
    means = {metric: statistics.mean(v) for metric, v in margins.items()}
    per_seed = [
        all(margins[m][i] >= GATE[m] for m in GATE) for i in range(len(results))
    ]
    return {
        "margins": margins,
        "mean_margins": means,
        "required": dict(GATE),
        "per_seed_passed": dict(zip([str(s) for s in results], per_seed)),
        "passed": all(means[m] >= GATE[m] for m in GATE),
    }


def gate_text(verdict: dict[str, Any]) -> str:
    parts = [
        f"{METRIC_NAMES[m]} {verdict['mean_margins'][m]:+.1f} (needs +{GATE[m]:.0f}; "
        + "per seed "
        + ", ".join(f"{v:+.1f}" for v in verdict["margins"][m])
        + ")"
        for m in GATE
    ]
    sides = ", ".join(
        f"seed {seed} {'above' if ok else 'below'}"
        for seed, ok in verdict["per_seed_passed"].items()
    )
    status = "PASSED" if verdict["passed"] else "NOT PASSED"
    return (
        f"Gate (P minus random initialisation, mean over seeds): {status}: "
        + "; ".join(parts)
        + f". Per seed: {sides}. "
        + (
            "Stage 2 starts from an object-aware P."
            if verdict["passed"]
            else "Stage 2 starts below the gate: its rows do not test CoTAP's claim."
        )
    )


def table(results: dict[int, dict[str, Any]], methods: list[str], p_label: str) -> str:
    """Markdown table: mean +- std (over seeds) of the mIoU in percent."""
    labels = {**LABELS, "P": p_label}
    lines = [
        "| model | "
        + " | ".join(f"{METRIC_NAMES[m]} mIoU (%)" for m in METRICS)
        + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    for method, scores in per_seed_scores(results, ["R", "P", *methods]).items():
        cells = []
        for metric in METRICS:
            values = scores[metric]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {std:.1f}")
        lines.append(f"| {labels[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_differences(results: dict[int, dict[str, Any]], methods: list[str]) -> str:
    """Per-seed linear-probe differences of (b) against the other stage-2 runs."""
    if "b_cotap" not in methods:
        return ""
    lines = [
        "| linear probe, (b) minus | mean (pp) | per seed (pp) |",
        "|---|---:|---|",
    ]
    for other in [m for m in methods if m != "b_cotap"]:
        diffs = [
            100
            * (
                r["b_cotap"]["scores"]["linear_probe"]
                - r[other]["scores"]["linear_probe"]
            )
            for r in results.values()
        ]
        per_seed = ", ".join(f"{d:+.1f}" for d in diffs)
        lines.append(
            f"| {LABELS[other]} | {statistics.mean(diffs):+.1f} | {per_seed} |"
        )
    return "\n".join(lines)


def diagnostics(results: dict[int, dict[str, Any]]) -> str:
    """Neighbour agreement with the scene layouts and CoTAP's final loss terms."""
    out = []
    agreement = [r["P"]["neighbors"] for r in results.values()]
    out.append(
        "P's CLS neighbours (positives of (b), (c)) share the background photo in "
        f"{100 * statistics.mean(a['neighbors_same_background'] for a in agreement):.0f}% "
        "of pairs (chance "
        f"{100 * statistics.mean(a['chance_same_background'] for a in agreement):.0f}%) "
        "and an object class in "
        f"{100 * statistics.mean(a['neighbors_shared_class'] for a in agreement):.0f}% "
        f"(chance {100 * statistics.mean(a['chance_shared_class'] for a in agreement):.0f}%)."
    )
    fg = [r["P"]["foreground_mask"] for r in results.values()]
    out.append(
        "P's CLS-attention foreground mask (the filter's mask in (b), (c)) on test "
        "scenes: precision "
        f"{100 * statistics.mean(f['precision'] for f in fg):.0f}% against an object "
        f"rate of {100 * statistics.mean(f['object_rate'] for f in fg):.0f}%, recall "
        f"{100 * statistics.mean(f['recall'] for f in fg):.0f}%."
    )
    for method in ("b_cotap", "c_cotap_no_rank", "b_cotap_label_pairs"):
        term_runs = [r[method]["loss_terms"] for r in results.values() if method in r]
        if not term_runs:
            continue
        names = sorted({name for terms in term_runs for name in terms})
        values = ", ".join(
            f"{name} {statistics.mean(t[name] for t in term_runs if name in t):.3f}"
            for name in names
        )
        out.append(f"{LABELS[method]}, loss terms over the last quarter: {values}.")
    return "\n".join(out)


@torch.no_grad()
def pca_figure(
    paths: Paths, cfg: Config, seed: int, out: Path, p_label: str, count: int = 4
) -> Path | None:
    """PCA-RGB of the dense features of P, (a) and (b) on ``count`` test scenes.

    One PCA per model, fitted jointly over the shown scenes; columns: input, P,
    (a), (b). Returns None when a model file is missing.
    """
    files = [out / "stage1" / f"seed{seed}.pth"] + [
        out / "models" / f"seed{seed}_{m}.pth" for m in PCA_METHODS
    ]
    if not all(f.is_file() for f in files):
        return None
    data = seed_data(paths.objects, paths.backgrounds, cfg, seed)
    images = torch.stack([image for image, _ in data.test[:count]])
    columns = [
        to_uint8_images(
            images, mean=IMAGENET_NORMALIZE["mean"], std=IMAGENET_NORMALIZE["std"]
        )
    ]
    for file in files:
        state = torch.load(file, map_location="cpu", weights_only=True)
        model = CoTAPVisionTransformer.from_checkpoint(state).eval()
        size = (images.shape[-2], images.shape[-1])
        columns.append(pca_rgb(dense_feature_fn(model)(images), size=size))
    titles = ["input", p_label.split(" (")[0], LABELS["a_dino"], LABELS["b_cotap"]]
    rows = [[column[i] for column in columns] for i in range(len(images))]
    path = out / "pca.png"
    save_image_grid(rows, path, cell_size=(128, 128))
    add_column_titles(path, titles, cell_width=128, padding=2)
    return path


def add_column_titles(
    path: Path, titles: list[str], cell_width: int, padding: int
) -> None:
    """Adds a white strip with one title per grid column on top of a PNG."""
    from PIL import Image, ImageDraw

    grid = Image.open(path).convert("RGB")
    canvas = Image.new("RGB", (grid.width, grid.height + 16), "white")
    canvas.paste(grid, (0, 16))
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(titles):
        draw.text((padding + column * (cell_width + padding) + 2, 2), title, "black")
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--objects", type=Path, default=CACHE / "objects")
    parser.add_argument("--backgrounds", type=Path, default=CACHE / "backgrounds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="Sizes of the run: 'cpu' (<= 60 min on 2 cores), 'gpu' (one GPU, "
        "larger ViT and images), 'quick' (smoke run).",
    )
    parser.add_argument("--quick", action="store_true", help="Same as --preset quick.")
    parser.add_argument(
        "--stage1",
        choices=("supervised", "dino"),
        default=None,
        help="Stage-1 objective (default: the preset's, supervised).",
    )
    parser.add_argument(
        "--stage1-checkpoint",
        type=Path,
        default=None,
        help="Start every seed from this P (e.g. OUT/stage1/seed0.pth) instead of "
        "training stage 1.",
    )
    parser.add_argument(
        "--stage1-objects",
        type=Path,
        default=None,
        help="Train stage 1 on every cut-out of this pool (class folders without "
        "the test objects, e.g. CACHE/stage1_objects from "
        "prepare_copy_paste_scenes.py) instead of the train split of --objects.",
    )
    parser.add_argument("--stage1-steps", type=int, default=None)
    parser.add_argument(
        "--stage1-images",
        type=int,
        default=None,
        help="Object-centric images rendered for stage 1.",
    )
    parser.add_argument(
        "--stage1-only",
        action="store_true",
        help="Stop after stage 1 and the gate (no stage-2 runs).",
    )
    parser.add_argument("--steps", type=int, default=None, help="Stage-2 steps.")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=STAGE2_METHODS,
        default=list(DEFAULT_METHODS),
        help="Stage-2 runs.",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="Worker processes (1 thread each on the CPU; default 2, 1 on a GPU).",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/dense_quality"))
    args = parser.parse_args()
    for name in ("objects", "backgrounds"):
        if not getattr(args, name).is_dir():
            parser.error(
                f"--{name} {getattr(args, name)} is not a folder; run "
                "benchmarks/prepare_copy_paste_scenes.py first."
            )
    if args.stage1_objects is not None and not args.stage1_objects.is_dir():
        parser.error(f"--stage1-objects {args.stage1_objects} is not a folder.")
    if args.stage1_checkpoint is not None and not args.stage1_checkpoint.is_file():
        parser.error(f"--stage1-checkpoint {args.stage1_checkpoint} is not a file.")
    cfg = copy.deepcopy(PRESETS["quick" if args.quick else args.preset])
    for field, value in (
        ("stage1", args.stage1),
        ("stage1_steps", args.stage1_steps),
        ("stage1_images", args.stage1_images),
        ("steps", args.steps),
    ):
        if value is not None:
            setattr(cfg, field, value)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        parser.error("--preset gpu needs a CUDA device.")
    jobs = args.jobs or (1 if cfg.device == "cuda" else 2)
    seeds = args.seeds[:1] if args.quick else args.seeds
    methods = [] if args.stage1_only else args.methods
    paths = Paths(args.objects, args.backgrounds, args.stage1_objects)
    p_label = STAGE1_LABELS[
        "checkpoint" if args.stage1_checkpoint is not None else cfg.stage1
    ]
    if args.stage1_checkpoint is None and args.stage1_objects is not None:
        p_label = p_label.replace("object class", "stamp class of the object pool")
        p_label = p_label.replace("object-centric images", "object pool")
    start = time.perf_counter()
    results = run(paths, cfg, seeds, methods, jobs, args.stage1_checkpoint, args.out)
    seconds = time.perf_counter() - start
    verdict = gate(results)
    device = (
        torch.cuda.get_device_name() if cfg.device == "cuda" else f"{jobs} processes"
    )
    header = (
        f"Dense quality on copy-paste scenes, {len(seeds)} seed(s), stage 1 "
        f"{cfg.stage1} {cfg.stage1_steps} steps, stage 2 {cfg.steps} steps, "
        f"{cfg.arch} depth {cfg.depth} patch {cfg.patch_size}, {cfg.global_crop}px "
        f"crops, {seconds / 60:.1f} min ({device})"
    )
    text = "\n\n".join(
        part
        for part in (
            header,
            gate_text(verdict),
            table(results, methods, p_label),
            paired_differences(results, methods),
            diagnostics(results),
        )
        if part
    )
    print(text)
    figure = pca_figure(paths, cfg, seeds[0], args.out, p_label)
    if figure is not None:
        print(f"PCA figure: {figure}")
    write_text(args.out / "table.md", text + "\n")
    rows = ["R", "P", *methods]
    # Plain json.dumps: a NaN metric must not cost the run its results file.
    write_text(
        args.out / "results.json",
        json.dumps(
            {
                "config": asdict(cfg),
                "stage1": p_label,
                "stage1_checkpoint": None
                if args.stage1_checkpoint is None
                else str(args.stage1_checkpoint),
                "stage1_objects": None
                if args.stage1_objects is None
                else str(args.stage1_objects),
                "seeds": seeds,
                "gate": verdict,
                "rows": per_seed_scores(results, rows),
                "results": {str(seed): r for seed, r in results.items()},
                "seconds": seconds,
            },
            indent=2,
        ),
    )


if __name__ == "__main__":
    main()
