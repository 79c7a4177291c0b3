"""Reading images as 8-bit RGB whatever their mode (the one reader of the package).

``PIL.Image.convert("RGB")`` clips 16-bit and 32-bit grey images to 255 (a 16-bit
PNG becomes almost white) and drops the alpha channel, exposing whatever colour the
transparent pixels happen to store. :func:`to_rgb` scales and composites instead;
training, evaluation and the sample images all read through :func:`read_rgb_image`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

#: File extensions read as images by the folder datasets.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

#: Colour that transparent pixels are composited onto. White, as image viewers and
#: web pages show cut-outs; a fixed colour keeps the colour stored under transparent
#: pixels (often arbitrary) out of the features.
ALPHA_BACKGROUND = (255, 255, 255)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded (empty, truncated or not an image)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts an image of any mode to 8-bit RGB.

    - 16-bit grey (``I;16*``) and 32-bit integer grey (``I``, read as the 16-bit
      range ``[0, 65535]``, which is how 16-bit files were opened before Pillow had
      ``I;16``) are scaled to ``[0, 255]``; float grey (``F``) is read as ``[0, 1]``.
    - Alpha (``RGBA``, ``LA``, ``PA``, palette images with transparency) is
      composited onto :data:`ALPHA_BACKGROUND`.
    - Everything else (``L``, ``P``, ``CMYK``, ``YCbCr``, ``1``, ...) uses Pillow's
      conversion.

    Args:
        image: A PIL image.

    Returns:
        An RGB image of the same size.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        grey = np.asarray(image).astype(np.float64) / 257.0
        return _grey_to_rgb(grey)
    if mode == "F":
        return _grey_to_rgb(np.asarray(image).astype(np.float64) * 255.0)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode == "P":
        return image.convert("RGB")
    if "A" in image.getbands() or mode in ("La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    values = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return Image.fromarray(values).convert("RGB")


def read_rgb_image(
    path: str | os.PathLike[str], *, draft_size: tuple[int, int] | None = None
) -> Image.Image:
    """Reads an image file as 8-bit RGB (see :func:`to_rgb`).

    Args:
        path: The image file.
        draft_size: If given, JPEGs are decoded at a reduced scale no smaller than
            this ``(W, H)`` (fast; used to check that a file decodes).

    Returns:
        The RGB image (fully loaded, file closed).

    Raises:
        UnreadableImageError: If the file is empty, truncated or not an image; the
            message names the file and the problem.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableImageError(f"{path}: empty file (0 bytes)")
        with Image.open(path) as image:
            if draft_size is not None:
                image.draft("RGB", draft_size)
            image.load()
            return to_rgb(image)
    except UnidentifiedImageError as ex:
        raise UnreadableImageError(f"{path}: not an image Pillow can read") from ex
    except UnreadableImageError:
        raise
    except Image.DecompressionBombError as ex:
        raise UnreadableImageError(f"{path}: too large to decode ({ex})") from ex
    except (OSError, ValueError, SyntaxError) as ex:
        # Truncated or corrupt data: Pillow raises OSError / SyntaxError /
        # ValueError depending on the format.
        raise UnreadableImageError(f"{path}: cannot be decoded ({ex})") from ex


def image_problem(path: str | os.PathLike[str]) -> str | None:
    """Checks that an image file decodes (JPEGs at reduced scale, fast).

    Args:
        path: The image file.

    Returns:
        ``None`` if it decodes, else the problem (names the file).
    """
    try:
        read_rgb_image(path, draft_size=(64, 64))
    except UnreadableImageError as ex:
        return str(ex)
    return None
