"""Noise tolerance of correspondence-distillation criteria on real copy-paste scenes.

CoTAP [0] argues that the teacher's patch correspondences are noisy, imbalanced
pseudo labels and that its continuous-target AP loss tolerates both, because it puts
no threshold on the targets (decision-agnostic) and down-weights badly mis-ranked
anchors (adaptive focusing). This benchmark measures the claim in a controlled study
whose ground truth is known, with every criterion plugged into the same
:class:`~lightly_cotap.loss.CoTAPLoss` pipeline.

- **Scenes**: :class:`~lightly_cotap.data.CopyPasteScenes` of the training split
  (real cut-outs of 7 classes on real background photos), the first
  ``objects_per_class`` cut-outs of every class, 96 px, 8 px patches (12 x 12). The
  clean class of a patch is the majority label of its pixels (background = 0).
- **Teacher**: synthetic patch features that encode the clean classes, corrupted in
  a controlled way: a patch of class ``c`` gets ``normalize((1 - a) e_c + a e_c2 +
  JITTER eps)`` with ``a ~ U(0, alpha)``, ``e`` one-hot, ``c2`` a uniformly drawn
  other class, ``eps`` standard normal. The teacher similarities are continuous and
  noisy: a patch partly looks like a confusing class, and ``a > 0.5`` makes it look
  like the wrong one (a wrong correspondence). Noise levels ``alpha`` go from 0
  (none) to 1 (half of the patches closer to a wrong class), ``NOISE_LEVELS``. The
  corruption is drawn once per scene (a teacher's mistakes are systematic) from a
  generator seeded by (seed, level), the same for every criterion.
- **Pairs and imbalance**: each step takes one image ``x`` per object class ``c`` (7
  images) and a neighbour ``x+`` that also shows ``c``. The foreground masks given to
  ``CoTAPLoss`` select ``top_k = 10`` patches of class ``c`` in ``x`` and, in
  ``x+``, ``m`` patches of class ``c`` and ``10 - m`` background patches; with one
  negative image (``num_negatives = 1``, another class by construction) the share of
  same-class pairs in the ranked list (1400 pairs) is exactly ``m / 20``, from 50 %
  (balanced) to 5 %. Cells are chosen on the clean masks so that the share is exact;
  the teacher's errors are in its features. The batches depend on (seed, share)
  only, so every criterion sees the same ones.
- **Student**: a small conv net on the pixels (15k parameters, 16-d patch features),
  trained from the same initialisation with AdamW (warm-up + cosine learning rate)
  for ``steps`` steps through ``CoTAPLoss`` (pool size 12 = one cell per patch,
  default anchor weights ``(t + 0.2)_+`` and ``negative_weight = 0.1``).
- **Evaluation** against the clean classes, on held-out scenes (new compositions of
  the same cut-outs and backgrounds: the study measures how well a criterion recovers
  the class structure from the teacher, not transfer to unseen objects): linear
  probe (BatchNorm + 1x1 conv, :func:`~lightly_cotap.eval.linear_probe_miou`, trained
  on ``num_probe`` labelled scenes, scored on ``num_test`` others) and k-means
  (K = 8, Hungarian, :func:`~lightly_cotap.eval.kmeans_segmentation`) mIoU of the
  L2-normalised student features (the criteria only see cosines).

Fairness. Same student, initialisation, batches, teacher, steps, optimiser and
schedule for every criterion. Each criterion's learning rate is the best of ``LRS``
by linear-probe mIoU at the clean, balanced setting on a separate seed
(``SWEEP_SEED``), the same procedure for all; nothing is tuned on a noisy or
imbalanced setting. The alternatives need a decision on the target scale that the
continuous-target criteria do not: which pairs are positive (binary-AP threshold,
STEGO shift, InfoNCE ``top_k``). Noise lowers the teacher's same-class similarity
(from 0.96 to about 0.4 at ``alpha = 1``), so one fixed threshold cannot be right at
every level. The main rows therefore give the alternatives the calibrated decision of
every setting, computed from the clean labels (an oracle the continuous criteria do
not need): threshold and shift at the midpoint between the teacher's mean same-class
and different-class similarity, ``top_k`` = the true number of same-class pairs of a
list. The ``*_fixed`` rows keep the decision a user would take from the clean teacher
(threshold / shift 0.5, ``top_k`` = half the list) at the settings where it differs
from the calibrated one (``criterion_settings``); they reuse the
learning rate of their calibrated row (both decisions coincide at the clean setting).
Temperatures are fixed at 0.1.

Settings: the noise axis at the balanced share (50 %), the imbalance axis at the
``IMBALANCE_NOISE`` level. "Beats by more than the seed spread" means the mean
difference over seeds exceeds the larger of the two standard deviations.

Diagnostics (what the criteria do with the noise): for every setting, the teacher's
mean same- / different-class similarity and the share of pairs whose thresholded
target contradicts the clean class; for every run, the *misleading gradient share*:
the share of the gradient mass of the criterion (on the scores of the ranked lists)
that pushes a pair against its clean relation (a same-class pair apart, a
different-class pair together), at the initial student and at the trained one.

Every (criterion, seed, setting) is one task on a pool of ``--jobs`` single-threaded
processes (two one-thread processes do more work than one two-thread process on 2
cores). Usage::

    python benchmarks/noise_tolerance.py --out outputs/noise_tolerance  # see below
    python benchmarks/noise_tolerance.py --quick --out /tmp/nt           # smoke run

The default run (216 trainings) takes about 14 min of CPU time, so roughly 7-8 min on two
free cores (estimated; measured: 27 min on 2 cores shared with other jobs at a load of
7-8). Finished
runs are kept in ``DIR/runs/`` and an interrupted run resumes from them;
``--report-only`` rewrites the table and the PNG from ``DIR/results.json``.

``--out DIR`` writes ``DIR/results.json`` (``{criterion: {setting: [per-seed
linear-probe mIoU]}}`` plus ``settings``, ``kmeans`` (same layout), ``lr``,
``diagnostics``, ``init``, ``config``), ``DIR/table.md`` and
``DIR/noise_tolerance.png``. The cut-outs and backgrounds come from
``benchmarks/prepare_copy_paste_scenes.py`` (``--objects`` / ``--backgrounds``).

- [0]: Wen et al., Semantic Concentration for Self-Supervised Dense Representations
  Learning, 2025, https://arxiv.org/abs/2509.09429
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import re
import statistics
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lr_schedule import set_lr
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from lightly_cotap.data import CopyPasteScenes
from lightly_cotap.data.segmentation_folder import image_to_tensor
from lightly_cotap.eval import DenseFeatures, kmeans_segmentation, linear_probe_miou
from lightly_cotap.loss import (
    BinaryAPLoss,
    ContinuousAPLoss,
    CoTAPLoss,
    HingeContinuousAPLoss,
    SimilarityKLLoss,
    SimilarityMSELoss,
    STEGOCorrelationLoss,
    TopKInfoNCELoss,
)
from lightly_cotap.loss.cotap_cells import pair_similarities

CACHE = Path.home() / ".cache/lightly_cotap/debian"
TEACHER_DIM = 16
#: alpha: the largest blend of a patch's teacher feature with a confusing class.
NOISE_LEVELS: dict[str, float] = {
    "none": 0.0,
    "medium": 0.6,
    "heavy": 0.8,
    "very heavy": 1.0,
}
JITTER = 0.05
#: Same-class patches among the top_k selected cells of x+ (share = m / 20).
POSITIVE_CELLS: dict[str, int] = {"50%": 10, "25%": 5, "10%": 2, "5%": 1}
IMBALANCE_NOISE = "medium"
NUM_NEGATIVES = 1
TEMPERATURE = 0.1
LRS = (3e-4, 1e-3, 3e-3)
SWEEP_SEED = 100
LABELS = {
    "continuous_ap": "ContinuousAPLoss (CoTAP)",
    "hinge_ap": "HingeContinuousAPLoss",
    "binary_ap": "BinaryAPLoss, calibrated threshold",
    "mse": "SimilarityMSELoss",
    "kl": "SimilarityKLLoss",
    "stego": "STEGOCorrelationLoss, calibrated shift",
    "infonce": "TopKInfoNCELoss, calibrated k",
    "binary_ap_fixed": "BinaryAPLoss, threshold 0.5",
    "stego_fixed": "STEGOCorrelationLoss, shift 0.5",
    "infonce_fixed": "TopKInfoNCELoss, k = half the list",
}
CRITERIA = tuple(LABELS)
#: The calibrated criterion whose learning rate a fixed-decision variant reuses.
LR_SOURCE = {name: name.removesuffix("_fixed") for name in CRITERIA}
REFERENCE = "continuous_ap"
LR_SOURCE_ORDER = sorted(set(LR_SOURCE.values()), key=list(LABELS).index)


@dataclass
class Config:
    """Sizes of one benchmark run."""

    scene_size: int = 96
    patch_size: int = 8
    objects_per_class: int = 3
    object_scale: tuple[float, float] = (0.5, 0.9)
    num_train: int = 512
    num_probe: int = 64
    num_test: int = 64
    purity: float = 0.75
    top_k: int = 10
    steps: int = 200
    weight_decay: float = 1e-4
    probe_steps: int = 100
    label_size: int = 48
    kmeans_n_init: int = 2
    diagnostic_batches: int = 10


QUICK = Config(
    num_train=64,
    num_probe=8,
    num_test=8,
    steps=3,
    probe_steps=5,
    kmeans_n_init=1,
    diagnostic_batches=2,
)


@dataclass(frozen=True)
class Setting:
    """One point of a curve: a noise level and a share of same-class pairs."""

    noise: str
    share: str
    axis: str

    @property
    def name(self) -> str:
        return f"noise={self.noise}, share={self.share}"


def all_settings() -> list[Setting]:
    """The noise axis at 50 % same-class pairs, then the rest of the imbalance axis."""
    noise_axis = [Setting(level, "50%", "noise") for level in NOISE_LEVELS]
    imbalance_axis = [
        Setting(IMBALANCE_NOISE, share, "imbalance")
        for share in POSITIVE_CELLS
        if share != "50%"
    ]
    return noise_axis + imbalance_axis


CLEAN = Setting("none", "50%", "noise")


def criterion_settings(name: str, settings: list[Setting]) -> list[Setting]:
    """The settings a criterion runs on.

    A fixed-decision variant runs only where its decision differs from the
    calibrated one: InfoNCE's half-the-list ``top_k`` is exact at 50 % same-class
    pairs, and the 0.5 threshold / shift is within 0.03 of the midpoint without
    noise.
    """
    if name == "infonce_fixed":
        return [s for s in settings if s.share != "50%"]
    if name.endswith("_fixed"):
        return [s for s in settings if s.noise != "none"]
    return settings


def axis_points(settings: list[Setting], axis: str) -> list[Setting]:
    """Settings of one curve in order (the imbalance curve starts at 50 %)."""
    if axis == "noise":
        return [s for s in settings if s.axis == "noise"]
    balanced = [s for s in settings if s.noise == IMBALANCE_NOISE and s.share == "50%"]
    return balanced + [s for s in settings if s.axis == "imbalance"]


# -- data ---------------------------------------------------------------------------


@dataclass
class SeedData:
    """Scenes of one seed as tensors, with the clean class of every patch."""

    train_images: Tensor  # (N, 3, S, S)
    patch_labels: Tensor  # (N, h, w), majority class
    patch_purity: Tensor  # (N, h, w), share of the majority class
    probe: DenseFeatures  # images as "features", label maps at label_size
    test: DenseFeatures
    num_classes: int


def render(
    objects: Path, backgrounds: Path, cfg: Config, seed: int, n: int
) -> tuple[Tensor, Tensor, int]:
    """Normalised images (N, 3, S, S), label maps (N, S, S) and the class count."""
    scenes = CopyPasteScenes(
        objects,
        backgrounds,
        split="train",
        num_samples=n,
        image_size=cfg.scene_size,
        object_scale=cfg.object_scale,
        seed=seed,
        max_background_side=512,
    )
    # A few cut-outs per class: the classes are learnable from pixels by a tiny
    # student, and the teacher alone says which cut-outs share a class.
    scenes.objects = {
        c: pool[: cfg.objects_per_class] for c, pool in scenes.objects.items()
    }
    images, masks = [], []
    for i in range(n):
        image, mask = scenes.sample(i)
        images.append(image_to_tensor(image))
        masks.append(torch.from_numpy(mask.astype(np.int64)))
    return torch.stack(images), torch.stack(masks), scenes.num_classes


def patch_classes(masks: Tensor, num_classes: int, patch: int) -> tuple[Tensor, Tensor]:
    """Majority class of every patch and its share of the patch's pixels."""
    one_hot = F.one_hot(masks, num_classes).permute(0, 3, 1, 2).float()
    purity, labels = F.avg_pool2d(one_hot, patch).max(dim=1)
    return labels, purity


def load_seed_data(
    objects: Path, backgrounds: Path, cfg: Config, seed: int
) -> SeedData:
    images, masks, num_classes = render(objects, backgrounds, cfg, seed, cfg.num_train)
    labels, purity = patch_classes(masks, num_classes, cfg.patch_size)
    held_out = []
    for n, offset in ((cfg.num_probe, 1000), (cfg.num_test, 2000)):
        x, m, _ = render(objects, backgrounds, cfg, seed + offset, n)
        small = F.interpolate(m[:, None].float(), size=cfg.label_size, mode="nearest")
        held_out.append(DenseFeatures(x, small[:, 0].long()))
    return SeedData(images, labels, purity, held_out[0], held_out[1], num_classes)


def teacher_features(labels: Tensor, num_classes: int, noise: str, seed: int) -> Tensor:
    """Synthetic teacher features of every patch (module docstring).

    Returns:
        Unit vectors, channel-last. Shape: (N, h, w, TEACHER_DIM).
    """
    alpha = NOISE_LEVELS[noise]
    gen = torch.Generator().manual_seed(seed * 1000 + list(NOISE_LEVELS).index(noise))
    blend = torch.rand(labels.shape, generator=gen)[..., None] * alpha
    shift = torch.randint(1, num_classes, labels.shape, generator=gen)
    own = F.one_hot(labels, TEACHER_DIM).float()
    confusing = F.one_hot((labels + shift) % num_classes, TEACHER_DIM).float()
    # Drawn in the (N, D, h, w) order of the noise so the numbers stay those of the
    # recorded runs.
    eps = torch.randn(own.permute(0, 3, 1, 2).shape, generator=gen).permute(0, 2, 3, 1)
    return F.normalize((1 - blend) * own + blend * confusing + JITTER * eps, dim=-1)


@dataclass
class Batches:
    """Image indices and foreground masks of every step (same for all criteria)."""

    x: Tensor  # (steps, B)
    pos: Tensor  # (steps, B)
    fg_x: Tensor  # (steps, B, 1, h, w)
    fg_pos: Tensor  # (steps, B, 1, h, w)

    def step(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.x[i], self.pos[i], self.fg_x[i], self.fg_pos[i]


def draw_batches(data: SeedData, cfg: Config, share: str, seed: int) -> Batches:
    """One (x, x+) pair per object class and step, with exactly chosen cells.

    Raises:
        ValueError: If a class has too few scenes with enough pure patches.
    """
    m, k = POSITIVE_CELLS[share], cfg.top_k
    rng = np.random.default_rng([seed, m])
    labels = data.patch_labels.flatten(1).numpy()
    pure = (data.patch_purity.flatten(1) >= cfg.purity).numpy()
    cells = [
        [np.flatnonzero(pure[i] & (labels[i] == c)) for i in range(len(labels))]
        for c in range(data.num_classes)
    ]
    classes = range(1, data.num_classes)
    anchors = {c: [i for i, v in enumerate(cells[c]) if len(v) >= k] for c in classes}
    neighbours = {
        c: [
            i
            for i, v in enumerate(cells[c])
            if len(v) >= m and len(cells[0][i]) >= k - m
        ]
        for c in classes
    }
    for c in classes:
        if not anchors[c] or len(neighbours[c]) < 2:
            raise ValueError(
                f"class {c} has too few of the {len(labels)} training scenes with "
                f"{k} pure patches; use more training scenes."
            )
    side = cfg.scene_size // cfg.patch_size
    shape = (cfg.steps, len(classes))
    x = np.zeros(shape, dtype=np.int64)
    pos = np.zeros(shape, dtype=np.int64)
    fg_x = np.zeros((*shape, side * side), dtype=np.float32)
    fg_pos = np.zeros((*shape, side * side), dtype=np.float32)
    for step in range(cfg.steps):
        for j, c in enumerate(classes):
            xi = int(rng.choice(anchors[c]))
            pi = int(rng.choice([i for i in neighbours[c] if i != xi]))
            x[step, j], pos[step, j] = xi, pi
            fg_x[step, j, rng.choice(cells[c][xi], k, replace=False)] = 1.0
            fg_pos[step, j, rng.choice(cells[c][pi], m, replace=False)] = 1.0
            fg_pos[step, j, rng.choice(cells[0][pi], k - m, replace=False)] = 1.0
    masks = (*shape, 1, side, side)
    return Batches(
        torch.from_numpy(x),
        torch.from_numpy(pos),
        torch.from_numpy(fg_x).reshape(masks),
        torch.from_numpy(fg_pos).reshape(masks),
    )


# -- lists of pairs (for the decisions and the diagnostics) ------------------------


def pair_lists(
    data: SeedData, features: Tensor, batches: Batches, steps: range
) -> tuple[Tensor, Tensor, Tensor]:
    """Cosines, clean same-class flags and CoTAP weight factors of the lists.

    The pairs are those of ``CoTAPLoss`` with the negative image of ``b`` fixed to
    ``b + 1`` (any other image gives the same statistics: all classes differ).

    Args:
        features: Patch features of the training scenes. Shape: (N, h, w, K).
        steps: Steps whose lists to build.

    Returns:
        ``(cosine, same_class, factor)``, each of shape (len(steps), n).
    """
    labels = data.patch_labels.flatten(1)
    flat = features.flatten(1, 2)  # (N, hw, K)
    cosines, same, factors = [], [], []
    for i in steps:
        x, pos, fg_x, fg_pos = batches.step(i)
        idx_x = fg_x.flatten(1).nonzero()[:, 1].reshape(len(x), -1)
        idx_p = fg_pos.flatten(1).nonzero()[:, 1].reshape(len(x), -1)
        cells_x = torch.stack([flat[x[b], idx_x[b]] for b in range(len(x))])
        cells_p = torch.stack([flat[pos[b], idx_p[b]] for b in range(len(x))])
        others = (torch.arange(len(x)) + 1)[:, None] % len(x)
        cos, is_pos = pair_similarities(
            anchors=cells_x, positives=cells_p, negative_index=others
        )
        lab_x = torch.stack([labels[x[b], idx_x[b]] for b in range(len(x))])
        lab_p = torch.stack([labels[pos[b], idx_p[b]] for b in range(len(x))])
        lab_p = lab_p[torch.cat([torch.arange(len(x))[:, None], others], dim=1)]
        cosines.append(cos.flatten())
        same.append((lab_x[:, None, :, None] == lab_p[:, :, None, :]).flatten())
        factors.append(torch.where(is_pos, 1.0, 0.1).flatten())
    return torch.stack(cosines), torch.stack(same), torch.stack(factors)


@dataclass
class TeacherStats:
    """The teacher's targets of a setting against the clean classes."""

    same: float
    different: float
    midpoint: float
    positives_per_list: int
    error_at_midpoint: float
    error_at_half: float


def teacher_stats(
    data: SeedData, teacher: Tensor, batches: Batches, cfg: Config, share: str
) -> TeacherStats:
    """Mean same- / different-class target and thresholding errors of a setting."""
    t, same, _ = pair_lists(data, teacher, batches, range(min(50, cfg.steps)))
    same_mean, diff_mean = float(t[same].mean()), float(t[~same].mean())
    midpoint = 0.5 * (same_mean + diff_mean)
    return TeacherStats(
        same=same_mean,
        different=diff_mean,
        midpoint=midpoint,
        positives_per_list=(data.num_classes - 1) * cfg.top_k * POSITIVE_CELLS[share],
        error_at_midpoint=float(((t >= midpoint) != same).float().mean()),
        error_at_half=float(((t >= 0.5) != same).float().mean()),
    )


# -- student, criteria, training ----------------------------------------------------


class Student(nn.Module):
    """Small conv net: (B, 3, 96, 96) pixels -> (B, 12, 12, 16) patch features."""

    def __init__(self, dim: int = TEACHER_DIM) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 32, 2, stride=2),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, dim, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out.permute(0, 2, 3, 1)  # channel-last (B, h, w, D)


def make_criterion(name: str, stats: TeacherStats, list_size: int) -> nn.Module:
    """The criterion ``name`` with its decision for the setting of ``stats``."""
    if name == "continuous_ap":
        return ContinuousAPLoss()
    if name == "hinge_ap":
        return HingeContinuousAPLoss()
    if name == "mse":
        return SimilarityMSELoss()
    if name == "kl":
        return SimilarityKLLoss(temperature=TEMPERATURE)
    calibrated = not name.endswith("_fixed")
    if name.startswith("binary_ap"):
        return BinaryAPLoss(threshold=stats.midpoint if calibrated else 0.5)
    if name.startswith("stego"):
        return STEGOCorrelationLoss(shift=stats.midpoint if calibrated else 0.5)
    if name.startswith("infonce"):
        k = stats.positives_per_list if calibrated else list_size // 2
        return TopKInfoNCELoss(top_k=k, temperature=TEMPERATURE)
    raise ValueError(f"unknown criterion {name!r}; choose from {CRITERIA}.")


def train_student(
    student: Student,
    data: SeedData,
    teacher: Tensor,
    batches: Batches,
    criterion: nn.Module,
    cfg: Config,
    lr: float,
    weight_offset: float = -0.2,
) -> list[float]:
    """Trains ``student`` through CoTAPLoss; returns the loss of every step."""
    loss_fn = CoTAPLoss(
        pool_sizes=(cfg.scene_size // cfg.patch_size,),
        top_k=cfg.top_k,
        num_negatives=NUM_NEGATIVES,
        weight_offset=weight_offset,
        criterion=criterion,
    )
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    losses = []
    student.train()
    for step in range(cfg.steps):
        set_lr(opt, step, cfg.steps, lr)
        x, pos, fg_x, fg_pos = batches.step(step)
        s_x, s_pos = student(torch.cat([data.train_images[x], data.train_images[pos]]))[
            :, None
        ].split(len(x))
        loss = loss_fn(
            student_x=s_x,
            student_pos=s_pos,
            teacher_x=teacher[x][:, None],
            teacher_pos=teacher[pos][:, None],
            fg_mask_x=fg_x,
            fg_mask_pos=fg_pos,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def student_features(student: Student, images: Tensor) -> Tensor:
    return torch.cat([student.eval()(b) for b in images.split(64)])


def misleading_gradient_share(
    student: Student,
    data: SeedData,
    teacher: Tensor,
    batches: Batches,
    criterion: nn.Module,
    steps: range,
) -> float:
    """Share of the criterion's gradient mass that pushes pairs against their class.

    On the lists of ``steps`` (student cosines as leaf scores, teacher cosines as
    targets, CoTAP's anchor weights), a pair is pushed together when ``-dL/ds > 0``;
    that is misleading for a different-class pair, and pushing apart is misleading
    for a same-class pair.
    """
    feats = student_features(student, data.train_images)
    s, same, factor = pair_lists(data, feats, batches, steps)
    t, _, _ = pair_lists(data, teacher, batches, steps)
    wrong, total = 0.0, 0.0
    for row in range(s.shape[0]):
        scores = s[row].clone().requires_grad_(True)
        weights = (t[row] + 0.2).clamp_min(0.0) * factor[row]
        loss = criterion(scores=scores, targets=t[row], weights=weights)
        (grad,) = torch.autograd.grad(loss, scores)
        pull = -grad
        wrong += float(pull[~same[row]].clamp_min(0).sum())
        wrong += float((-pull[same[row]]).clamp_min(0).sum())
        total += float(grad.abs().sum())
    return wrong / total if total > 0 else 0.0


def evaluate(
    student: Student, data: SeedData, cfg: Config, seed: int
) -> dict[str, float]:
    """Linear-probe and k-means mIoU of the student's normalised patch features."""
    probe, test = (
        DenseFeatures(
            # LAYOUT BRIDGE, removed when eval takes channel-last features.
            F.normalize(student_features(student, d.features), dim=-1).permute(
                0, 3, 1, 2
            ),
            d.masks,
        )
        for d in (data.probe, data.test)
    )
    linear = linear_probe_miou(
        probe, test, data.num_classes, steps=cfg.probe_steps, seed=seed, progress=False
    )
    kmeans = kmeans_segmentation(
        test, data.num_classes, n_init=cfg.kmeans_n_init, seed=seed, progress=False
    )
    return {"linear_probe": float(linear["miou"]), "kmeans": float(kmeans["miou"])}


# -- tasks --------------------------------------------------------------------------


@dataclass
class Paths:
    objects: Path
    backgrounds: Path


_SEED_DATA: dict[int, SeedData] = {}


def seed_data(paths: Paths, cfg: Config, seed: int) -> SeedData:
    """The scenes of ``seed``, rendered once per worker process."""
    if seed not in _SEED_DATA:
        _SEED_DATA[seed] = load_seed_data(paths.objects, paths.backgrounds, cfg, seed)
    return _SEED_DATA[seed]


def run_task(
    paths: Paths, cfg: Config, criterion: str, setting: Setting, seed: int, lr: float
) -> dict[str, Any]:
    """Trains and evaluates one student; returns its scores and diagnostics."""
    start, cpu_start = time.perf_counter(), time.process_time()
    data = seed_data(paths, cfg, seed)
    teacher = teacher_features(data.patch_labels, data.num_classes, setting.noise, seed)
    batches = draw_batches(data, cfg, setting.share, seed)
    stats = teacher_stats(data, teacher, batches, cfg, setting.share)
    list_size = (data.num_classes - 1) * cfg.top_k**2 * (1 + NUM_NEGATIVES)
    loss_fn = make_criterion(criterion, stats, list_size)
    torch.manual_seed(seed)
    student = Student()
    first = range(min(cfg.diagnostic_batches, cfg.steps))
    last = range(cfg.steps - len(first), cfg.steps)
    misleading_init = misleading_gradient_share(
        student, data, teacher, batches, loss_fn, first
    )
    losses = train_student(student, data, teacher, batches, loss_fn, cfg, lr)
    misleading_trained = misleading_gradient_share(
        student, data, teacher, batches, loss_fn, last
    )
    return {
        "scores": evaluate(student, data, cfg, seed),
        "teacher": asdict(stats),
        "misleading_init": misleading_init,
        "misleading_trained": misleading_trained,
        "loss_first": losses[0],
        "loss_last": statistics.mean(losses[-len(first) :]),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
    }


def init_task(paths: Paths, cfg: Config, seed: int) -> dict[str, float]:
    """Scores of the untrained student (the floor)."""
    torch.manual_seed(seed)
    return evaluate(Student(), seed_data(paths, cfg, seed), cfg, seed)


def _init_worker() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)


class TaskCache:
    """One JSON file per finished task: an interrupted run resumes where it stopped.

    The folder is specific to the configuration.
    """

    def __init__(self, folder: Path, cfg: Config) -> None:
        digest = hashlib.sha1(json.dumps(asdict(cfg)).encode()).hexdigest()[:10]
        self.folder = folder / digest
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, *key: Any) -> Path:
        name = "_".join(str(k) for k in key)
        return self.folder / (re.sub(r"[^A-Za-z0-9.=-]+", "-", name) + ".json")

    def load(self, *key: Any) -> Any:
        path = self.path(*key)
        return json.loads(path.read_text()) if path.exists() else None

    def save(self, value: Any, *key: Any) -> None:
        self.path(*key).write_text(json.dumps(value))


def run(
    paths: Paths,
    cfg: Config,
    criteria: list[str],
    seeds: list[int],
    jobs: int,
    cache: TaskCache,
) -> dict[str, Any]:
    """The learning-rate sweep, then every (criterion, setting, seed) run.

    A criterion's runs are queued as soon as its sweep is done; tasks found in
    ``cache`` are not run again.
    """
    settings = all_settings()
    sweep = sorted({LR_SOURCE[c] for c in criteria})
    lr_scores: dict[str, dict[float, float]] = {c: {} for c in sweep}
    runs: dict[str, dict[str, dict[int, dict[str, Any]]]] = {
        c: {s.name: {} for s in criterion_settings(c, settings)} for c in criteria
    }
    init: dict[int, dict[str, float]] = {}
    best_lr: dict[str, float] = {}
    cpu_seconds = 0.0
    total = len(sweep) * len(LRS) + len(seeds) * (1 + sum(map(len, runs.values())))
    context = multiprocessing.get_context("spawn")
    with (
        ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker) as pool,
        tqdm(total=total, desc="noise tolerance", unit="run") as bar,
    ):
        pending: dict[Future[Any], tuple[Any, ...]] = {}

        def submit(key: tuple[Any, ...], fn: Any, *args: Any) -> None:
            cached = cache.load(*key)
            if cached is not None:
                done_now.append((key, cached))
            else:
                pending[pool.submit(fn, *args)] = key

        done_now: list[tuple[tuple[Any, ...], Any]] = []
        for c in sweep:
            for lr in LRS:
                submit(("sweep", c, lr), run_task, paths, cfg, c, CLEAN, SWEEP_SEED, lr)
        for seed in seeds:
            submit(("init", seed), init_task, paths, cfg, seed)
        while pending or done_now:
            if not done_now:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    key = pending.pop(future)
                    result = future.result()
                    cache.save(result, *key)
                    done_now.append((key, result))
            key, result = done_now.pop(0)
            bar.update()
            if key[0] != "init":
                cpu_seconds += result["cpu_seconds"]
            if key[0] == "init":
                init[key[1]] = result
            elif key[0] == "sweep":
                _, c, lr = key
                lr_scores[c][lr] = result["scores"]["linear_probe"]
                if len(lr_scores[c]) == len(LRS):
                    best_lr[c] = max(LRS, key=lambda v: lr_scores[c][v])
                    tqdm.write(f"{c}: lr {best_lr[c]:g} ({lr_scores[c]})")
                    for name in (n for n in criteria if LR_SOURCE[n] == c):
                        for seed in seeds:
                            for setting in criterion_settings(name, settings):
                                args = (name, setting, seed, best_lr[c])
                                submit(("run", *args), run_task, paths, cfg, *args)
            else:
                _, name, setting, seed, _ = key
                runs[name][setting.name][seed] = result
    return {
        "settings": settings,
        "lr": {c: best_lr[LR_SOURCE[c]] for c in criteria},
        "lr_sweep": lr_scores,
        "runs": runs,
        "init": init,
        "cpu_seconds": cpu_seconds,
    }


# -- report -------------------------------------------------------------------------


def to_report(result: dict[str, Any], cfg: Config, seconds: float) -> dict[str, Any]:
    """The content of results.json.

    ``{criterion: {setting: [per-seed linear-probe mIoU]}}`` plus ``kmeans`` (same
    layout), ``settings``, ``seeds``, ``lr``, ``lr_sweep``, ``init`` (the untrained
    student), ``diagnostics`` (``{criterion: {setting: {seed: {...}}}}``),
    ``config``, ``seconds`` (wall) and ``cpu_seconds`` (summed over all runs).
    """
    runs = result["runs"]
    settings: list[Setting] = result["settings"]

    def scores(key: str) -> dict[str, dict[str, list[float]]]:
        return {
            name: {
                s.name: [by_seed[seed]["scores"][key] for seed in sorted(by_seed)]
                for s in settings
                if (by_seed := runs[name].get(s.name)) is not None
            }
            for name in runs
        }

    report: dict[str, Any] = dict(scores("linear_probe"))
    report["kmeans"] = scores("kmeans")
    report["settings"] = [
        {
            "name": s.name,
            "axis": s.axis,
            "noise": s.noise,
            "alpha": NOISE_LEVELS[s.noise],
            "share": s.share,
        }
        for s in settings
    ]
    report["seeds"] = sorted(result["init"])
    report["lr"] = result["lr"]
    report["lr_sweep"] = {
        c: {f"{lr:g}": v for lr, v in d.items()} for c, d in result["lr_sweep"].items()
    }
    report["init"] = {str(seed): r for seed, r in result["init"].items()}
    report["diagnostics"] = {
        name: {
            setting: {
                str(seed): {k: v for k, v in r.items() if k != "scores"}
                for seed, r in by_seed.items()
            }
            for setting, by_seed in by_setting.items()
        }
        for name, by_setting in runs.items()
    }
    report["config"] = asdict(cfg)
    report["seconds"] = seconds
    report["cpu_seconds"] = result["cpu_seconds"]
    return report


def criteria_of(report: dict[str, Any]) -> list[str]:
    return [name for name in LABELS if name in report]


def settings_of(report: dict[str, Any]) -> list[Setting]:
    return [Setting(s["noise"], s["share"], s["axis"]) for s in report["settings"]]


def scores_of(
    report: dict[str, Any], name: str, setting: Setting, key: str
) -> list[float] | None:
    """Per-seed mIoU in percent (``None`` if the criterion did not run it)."""
    table = report[name] if key == "linear_probe" else report["kmeans"][name]
    values = table.get(setting.name)
    return None if values is None else [100 * v for v in values]


def mean_std(values: list[float]) -> tuple[float, float]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.mean(values), std


def column(setting: Setting) -> str:
    if setting.axis == "noise":
        return f"noise {setting.noise}"
    return f"{setting.share} same-class"


def score_table(report: dict[str, Any], key: str) -> str:
    """Criteria x settings: mean +- std over seeds of the mIoU in percent."""
    settings = settings_of(report)
    lines = [
        "| criterion (lr) | " + " | ".join(map(column, settings)) + " |",
        "|---|" + "---:|" * len(settings),
    ]
    m, s = mean_std([100 * r[key] for r in report["init"].values()])
    cells = [f"{m:.1f} ± {s:.1f}"] * len(settings)
    lines.append("| untrained student | " + " | ".join(cells) + " |")
    for name in criteria_of(report):
        cells = []
        for setting in settings:
            values = scores_of(report, name, setting, key)
            if values is None:
                cells.append("=")
                continue
            m, s = mean_std(values)
            cells.append(f"{m:.1f} ± {s:.1f}")
        label = f"{LABELS[name]} ({report['lr'][name]:g})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_settings(settings: list[Setting]) -> list[Setting]:
    """The two heaviest noise levels and the strongest imbalance."""
    return axis_points(settings, "noise")[-2:] + axis_points(settings, "imbalance")[-1:]


def verdict_table(report: dict[str, Any]) -> str:
    """ContinuousAPLoss minus each alternative where the claim is about.

    Linear probe, percentage points: the mean difference, whether it exceeds the
    seed spread (the larger standard deviation of the two), the per-seed
    differences.
    """
    if REFERENCE not in report:
        return ""
    targets = verdict_settings(settings_of(report))
    lines = [
        "| ContinuousAPLoss minus | " + " | ".join(map(column, targets)) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for name in criteria_of(report):
        if name == REFERENCE:
            continue
        cells = []
        for setting in targets:
            a = scores_of(report, REFERENCE, setting, "linear_probe")
            b = scores_of(report, name, setting, "linear_probe")
            if a is None or b is None:
                cells.append("=")
                continue
            diff = statistics.mean(a) - statistics.mean(b)
            spread = max(mean_std(a)[1], mean_std(b)[1])
            verdict = "within spread"
            if abs(diff) > spread:
                verdict = "beats" if diff > 0 else "loses"
            per = ", ".join(f"{x - y:+.1f}" for x, y in zip(a, b))
            cells.append(f"{diff:+.1f} {verdict} ({per})")
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diagnostics_table(report: dict[str, Any]) -> str:
    """Teacher statistics per setting and misleading gradient shares."""
    settings = settings_of(report)
    diagnostics = report["diagnostics"]
    full = next(d for d in diagnostics.values() if len(d) == len(settings))
    lines = [
        "| setting | same-class target | different-class target | midpoint | "
        "pairs misclassified by the midpoint / by 0.5 |",
        "|---|---:|---:|---:|---:|",
    ]
    for setting in settings:
        stats = [r["teacher"] for r in full[setting.name].values()]
        mean = {k: statistics.mean(s[k] for s in stats) for k in stats[0]}
        lines.append(
            f"| {setting.name} | {mean['same']:.2f} | {mean['different']:.2f} | "
            f"{mean['midpoint']:.2f} | {100 * mean['error_at_midpoint']:.0f}% / "
            f"{100 * mean['error_at_half']:.0f}% |"
        )
    lines += [
        "",
        "Misleading gradient share (%) at the initial / trained student:",
        "",
        "| criterion | " + " | ".join(map(column, settings)) + " |",
        "|---|" + "---:|" * len(settings),
    ]
    for name in criteria_of(report):
        cells = []
        for setting in settings:
            if setting.name not in diagnostics[name]:
                cells.append("=")
                continue
            runs = list(diagnostics[name][setting.name].values())
            a = statistics.mean(x["misleading_init"] for x in runs)
            b = statistics.mean(x["misleading_trained"] for x in runs)
            cells.append(f"{100 * a:.0f} / {100 * b:.0f}")
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Quality vs noise and vs imbalance, one line per criterion.

    The band is the seed spread (mean +- std); fixed-decision variants are dotted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = settings_of(report)
    metric_names = {"linear_probe": "linear probe", "kmeans": "k-means"}
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), sharey="row")
    for row, key in enumerate(metric_names):
        for col, axis in enumerate(("noise", "imbalance")):
            ax = axes[row, col]
            points = axis_points(settings, axis)
            for name in criteria_of(report):
                xs, mean, std = [], [], []
                for x, setting in enumerate(points):
                    values = scores_of(report, name, setting, key)
                    if values is not None:
                        m, s = mean_std(values)
                        xs.append(x)
                        mean.append(m)
                        std.append(s)
                color = f"C{LR_SOURCE_ORDER.index(LR_SOURCE[name])}"
                ax.plot(
                    xs,
                    mean,
                    ":" if name.endswith("_fixed") else "-",
                    color=color,
                    lw=2.5 if name == REFERENCE else 1.2,
                    marker="o",
                    ms=3,
                    label=LABELS[name],
                )
                low = np.array(mean) - np.array(std)
                ax.fill_between(
                    xs, low, low + 2 * np.array(std), color=color, alpha=0.1
                )
            init = [100 * r[key] for r in report["init"].values()]
            ax.axhline(
                statistics.mean(init),
                color="grey",
                ls="--",
                lw=1,
                label="untrained student",
            )
            ax.set_xticks(range(len(points)))
            if axis == "noise":
                ax.set_xticklabels(
                    [f"{s.noise}\n(alpha {NOISE_LEVELS[s.noise]})" for s in points]
                )
                title = "noise (50% same-class pairs)"
            else:
                ax.set_xticklabels([f"{s.share} same-class" for s in points])
                title = f"imbalance (noise {IMBALANCE_NOISE})"
            ax.set_title(f"{metric_names[key]} vs {title}", fontsize=10)
            ax.set_ylabel(f"{metric_names[key]} mIoU (%)")
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle(
        "Criteria in CoTAPLoss against teacher noise and imbalance "
        f"(mean ± std over {len(report['seeds'])} seeds)"
    )
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    fig.savefig(path, dpi=72)
    plt.close(fig)
    # A 128-colour palette keeps the PNG small enough to commit (about 4x smaller).
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=128)
    small.save(path, optimize=True)


def write_report(report: dict[str, Any], out: Path) -> str:
    """Writes table.md and the PNG (results.json must exist); returns the text."""
    cfg = report["config"]
    header = (
        "Noise tolerance of correspondence criteria in CoTAPLoss: "
        f"{len(report['seeds'])} seed(s), {cfg['steps']} steps, "
        f"{cfg['num_train']} training scenes; {report['seconds'] / 60:.1f} min wall, "
        f"{report['cpu_seconds'] / 60:.1f} min of CPU time in the runs."
    )
    text = "\n\n".join(
        part
        for part in (
            header,
            "Linear-probe mIoU (%), mean ± std over seeds (= not run: the "
            "decision equals the calibrated one):",
            score_table(report, "linear_probe"),
            "k-means mIoU (%):",
            score_table(report, "kmeans"),
            "ContinuousAPLoss minus each alternative, linear probe (pp; per seed):",
            verdict_table(report),
            "Teacher targets of the ranked lists against the clean classes:",
            diagnostics_table(report),
        )
        if part
    )
    (out / "table.md").write_text(text + "\n")
    plot(report, out / "noise_tolerance.png")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=Path, default=CACHE / "objects")
    parser.add_argument("--backgrounds", type=Path, default=CACHE / "backgrounds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--criteria", nargs="+", choices=CRITERIA, default=list(CRITERIA)
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="Worker processes (1 thread each)."
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--out", type=Path, default=Path("outputs/noise_tolerance"))
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="Rewrite table.md and the PNG from OUT/results.json (no runs).",
    )
    args = parser.parse_args()
    if args.report_only:
        report = json.loads((args.out / "results.json").read_text())
        print(write_report(report, args.out))
        return
    for name in ("objects", "backgrounds"):
        if not getattr(args, name).is_dir():
            parser.error(
                f"--{name} {getattr(args, name)} is not a folder; run "
                "benchmarks/prepare_copy_paste_scenes.py first."
            )
    cfg = QUICK if args.quick else Config()
    seeds = args.seeds[:1] if args.quick else args.seeds
    start = time.perf_counter()
    result = run(
        Paths(args.objects, args.backgrounds),
        cfg,
        args.criteria,
        seeds,
        args.jobs,
        TaskCache(args.out / "runs", cfg),
    )
    report = to_report(result, cfg, time.perf_counter() - start)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    print(write_report(report, args.out))


if __name__ == "__main__":
    main()
