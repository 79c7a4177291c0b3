"""Images of the dense-quality benchmark.

Stage-1 object-centric images, stage-2 training scenes, labelled probe and test
scenes, and the CoTAP crops of the single-image methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dense_quality_config import Config, Paths
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightly_cotap.data import CopyPasteScenes
from lightly_cotap.data.copy_paste_scenes import Split
from lightly_cotap.transforms import CoTAPTransform


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
