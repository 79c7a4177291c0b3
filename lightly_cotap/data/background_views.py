"""Random background views that never repeat recognisably.

A small pool of background photos recurs in every sample of a copy-paste data set, so
an image-level objective can learn the photo instead of the objects (the photo is the
easiest feature that identifies an image and its augmented views). A
:class:`BackgroundView` breaks that shortcut: half of the backgrounds are procedural
multi-octave colour-noise textures, the other half random crops (20-100% of the short
side) of the photos with random flips, 90-degree rotations, colour, brightness and
contrast changes and 20% greyscale.

Views are drawn with :meth:`BackgroundView.draw` from a NumPy generator and rendered
with :meth:`BackgroundView.render`, so a data set stays a pure function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


@dataclass(frozen=True)
class BackgroundView:
    """Parameters of one random background.

    Attributes:
        texture_seed: Seed of a procedural texture, or None for a photo crop.
        crop: ``(x0, y0, x1, y1)`` square crop of the photo as fractions of its size
            (ignored for textures).
        flip: Mirror horizontally.
        rotation: Number of 90-degree rotations.
        color: Saturation factor (1 = unchanged).
        brightness: Brightness factor.
        contrast: Contrast factor.
        grayscale: Convert to greyscale.
    """

    texture_seed: int | None
    crop: tuple[float, float, float, float]
    flip: bool
    rotation: int
    color: float
    brightness: float
    contrast: float
    grayscale: bool

    @classmethod
    def draw(
        cls,
        rng: np.random.Generator,
        photo_size: tuple[int, int],
        *,
        texture_prob: float = 0.5,
        crop_scale: tuple[float, float] = (0.2, 1.0),
    ) -> BackgroundView:
        """Draws random view parameters.

        Args:
            rng: NumPy generator (consumed).
            photo_size: ``(width, height)`` of the photo the crop is taken from.
            texture_prob: Probability of a procedural texture instead of a photo.
            crop_scale: Range of the crop side as a fraction of the photo's short side.

        Returns:
            The view.
        """
        width, height = photo_size
        texture = bool(rng.random() < texture_prob)
        side = rng.uniform(*crop_scale) * min(width, height)
        x0 = rng.uniform(0, width - side)
        y0 = rng.uniform(0, height - side)
        return cls(
            texture_seed=int(rng.integers(2**31)) if texture else None,
            crop=(x0 / width, y0 / height, (x0 + side) / width, (y0 + side) / height),
            flip=bool(rng.random() < 0.5),
            rotation=int(rng.integers(4)),
            color=float(rng.uniform(0.2, 1.8)),
            brightness=float(rng.uniform(0.6, 1.4)),
            contrast=float(rng.uniform(0.6, 1.4)),
            grayscale=bool(rng.random() < 0.2),
        )

    def render(self, photo: Image.Image, size: int) -> Image.Image:
        """Renders the view as an RGB image of ``size`` x ``size`` pixels.

        Args:
            photo: The background photo (unused for a procedural texture).
            size: Side of the output in pixels.

        Returns:
            The background image.
        """
        if self.texture_seed is not None:
            image = procedural_texture(size, np.random.default_rng(self.texture_seed))
        else:
            width, height = photo.size
            x0, y0, x1, y1 = self.crop
            box = (x0 * width, y0 * height, x1 * width, y1 * height)
            image = photo.convert("RGB").resize(
                (size, size), Image.Resampling.BILINEAR, box=box
            )
        if self.flip:
            image = ImageOps.mirror(image)
        image = image.rotate(90 * self.rotation)
        image = ImageEnhance.Color(image).enhance(self.color)
        image = ImageEnhance.Brightness(image).enhance(self.brightness)
        image = ImageEnhance.Contrast(image).enhance(self.contrast)
        if self.grayscale:
            image = ImageOps.grayscale(image).convert("RGB")
        return image


def procedural_texture(
    size: int, rng: np.random.Generator, octaves: int = 4
) -> Image.Image:
    """Multi-octave colour-noise texture (sum of upsampled random grids).

    Args:
        size: Side of the square texture in pixels.
        rng: NumPy generator (consumed).
        octaves: Number of octaves; octave ``o`` is a ``(2^o + 1)``-cell grid with
            amplitude ``2^-o``.

    Returns:
        RGB image of ``size`` x ``size`` pixels, stretched to the full 0-255 range.
    """
    out = np.zeros((size, size, 3), np.float32)
    for octave in range(1, octaves + 1):
        cells = 2**octave + 1
        grid = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
        layer = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
        out += np.asarray(layer, np.float32) / 2**octave
    out -= out.min()
    out *= 255 / max(float(out.max()), 1e-6)
    return Image.fromarray(out.astype(np.uint8))
