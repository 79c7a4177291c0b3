"""Data of the image-level benchmark: Tux Paint photo stamps, split and datasets."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lightly_cotap.data import tuxpaint_class_folders


def load_stamps(objects: Path, cache: Path) -> tuple[list[Path], list[int], list[str]]:
    """Returns the cut-out paths, labels and class names; builds the folders if needed."""
    if not objects.is_dir() or not any(objects.iterdir()):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from prepare_copy_paste_scenes import fetch_debian_packages

        root = fetch_debian_packages(cache, apt_update=False, keep_debs=False)
        tuxpaint_class_folders(root / "usr/share/tuxpaint/stamps", objects)
    classes = sorted(p.name for p in objects.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((objects / name).glob("*.png")):
            paths.append(path)
            labels.append(label)
    if not paths:
        raise SystemExit(f"no cut-outs found in {objects}")
    return paths, labels, classes


def composite(path: Path, size: int) -> Image.Image:
    """The RGBA cut-out on a grey square, resized to ``size``."""
    with Image.open(path) as raw:
        rgba = raw.convert("RGBA")
    side = max(rgba.size)
    canvas = Image.new("RGBA", (side, side), (128, 128, 128, 255))
    canvas.alpha_composite(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
    return canvas.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def stratified_split(labels: list[int], seed: int = 0) -> tuple[list[int], list[int]]:
    """Half of every class for training, the rest for testing."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(members)
        half = (len(members) + 1) // 2
        train += members[:half]
        test += members[half:]
    return sorted(train), sorted(test)


class ImageList(Dataset[tuple[Any, int]]):
    """(image, label) pairs with an optional transform; ``targets`` for the pairs."""

    def __init__(
        self,
        images: list[Image.Image],
        labels: list[int],
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        self.images = images
        self.targets = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image: Any = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def forever(loader: DataLoader[Any]) -> Iterator[Any]:
    while True:
        yield from loader
