"""Data of the noise-tolerance benchmark.

Scenes of a seed, the synthetic noisy teacher, the pairs and cells of every step and
the teacher's statistics against the clean classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from noise_tolerance_settings import (
    JITTER,
    NOISE_LEVELS,
    POSITIVE_CELLS,
    TEACHER_DIM,
    Config,
)
from torch import Tensor

from lightly_cotap.data import CopyPasteScenes
from lightly_cotap.data.segmentation_folder import image_to_tensor
from lightly_cotap.eval import DenseFeatures
from lightly_cotap.loss.cotap_cells import pair_similarities


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


@dataclass
class Paths:
    """Input folders: object cut-outs and background photos."""

    objects: Path
    backgrounds: Path


_SEED_DATA: dict[int, SeedData] = {}


def seed_data(paths: Paths, cfg: Config, seed: int) -> SeedData:
    """The scenes of ``seed``, rendered once per worker process."""
    if seed not in _SEED_DATA:
        _SEED_DATA[seed] = load_seed_data(paths.objects, paths.backgrounds, cfg, seed)
    return _SEED_DATA[seed]
