"""Draws the method figures of the docs from the embedded sample photos.

Usage (from the repository root)::

    python docs/make_figures.py            # writes docs/source/_static/figures/
    python docs/make_figures.py --out DIR

The figures show what each method's transform and pairing feed the model; they
need no training, network or extra data. The benchmark figures of the CoTAP
page are the PNGs under ``benchmarks/results/`` that the benchmarks write.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lightly.transforms import (
    BYOLTransform,
    BYOLView1Transform,
    BYOLView2Transform,
    SimCLRTransform,
)
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import make_grid, save_image

from lightly_cotap.data import SampleImageDataset
from lightly_cotap.transforms import BagSSLTransform

FIGURES = Path(__file__).resolve().parent / "source" / "_static" / "figures"
SIZE = 128


def _unnormalize(images: Tensor) -> Tensor:
    """ImageNet-normalised images back to [0, 1]."""
    mean = torch.tensor(IMAGENET_NORMALIZE["mean"]).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_NORMALIZE["std"]).view(-1, 1, 1)
    return (images * std + mean).clamp(0, 1)


def _square(image: Image.Image, size: int = SIZE) -> Tensor:
    """Centre square of a PIL image as a (3, size, size) tensor in [0, 1]."""
    image = TF.center_crop(TF.resize(image, size), [size, size])
    tensor: Tensor = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
    return tensor


def _resized(views: list[Tensor], size: int = SIZE) -> list[Tensor]:
    """Normalised views of any size as (3, size, size) images in [0, 1]."""
    return [_unnormalize(TF.resize(view, [size, size])) for view in views]


def _draw_grid(image: Tensor, cells: int) -> Tensor:
    """Draws the lines of a cells x cells grid onto a copy of the image."""
    image = image.clone()
    size = image.shape[-1]
    for i in range(1, cells):
        line = i * size // cells
        image[:, line, :] = 1.0
        image[:, :, line] = 1.0
    return image


def semantic_pairs_figure(images: SampleImageDataset, out: Path) -> None:
    """Curated pairs: each image x (top) with its semantic positive x+ (bottom)."""
    index = {name: i for i, name in enumerate(images.filenames)}
    pairs = [
        ("astronaut.jpg", "camera.jpg"),
        ("hubble_deep_field.jpg", "rocket.jpg"),
        ("coffee.jpg", "coins.jpg"),
    ]
    top = [_square(images[index[a]][0]) for a, _ in pairs]
    bottom = [_square(images[index[b]][0]) for _, b in pairs]
    save_image(make_grid(top + bottom, nrow=len(pairs), padding=4, pad_value=1), out)


def dsa_figure(images: SampleImageDataset, out: Path) -> None:
    """Per image (row): the two SimCLR views and the un-augmented origin view."""
    simclr = SimCLRTransform(input_size=SIZE)
    rows = []
    for i in range(4):
        image = images[i][0]
        rows += _resized(simclr(image)) + [_square(image)]
    save_image(make_grid(rows, nrow=3, padding=4, pad_value=1), out)


def cossl_figure(images: SampleImageDataset, out: Path) -> None:
    """Two BYOL views of each image with the grid of their local features."""
    byol = BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=SIZE),
        view_2_transform=BYOLView2Transform(input_size=SIZE),
    )
    views = []
    for i in (0, 2, 4):
        views += [_draw_grid(view, cells=4) for view in _resized(byol(images[i][0]))]
    save_image(make_grid(views, nrow=2, padding=4, pad_value=1), out)


def bagssl_figure(images: SampleImageDataset, out: Path) -> None:
    """Per image (row): the image and the bag of random patches BagSSL sees."""
    transform = BagSSLTransform(n_patches=4, patch_size=32, image_size=SIZE)
    rows = []
    for i in (0, 2, 7):
        image = images[i][0]
        rows += [_square(image)] + _resized(transform(image))
    save_image(make_grid(rows, nrow=5, padding=4, pad_value=1), out)


def main(argv: list[str] | None = None) -> None:
    """Writes every figure to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=FIGURES)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    images = SampleImageDataset()
    semantic_pairs_figure(images, args.out / "semantic_pairs.png")
    dsa_figure(images, args.out / "dsa.png")
    cossl_figure(images, args.out / "cossl.png")
    bagssl_figure(images, args.out / "bagssl.png")


if __name__ == "__main__":
    main()
