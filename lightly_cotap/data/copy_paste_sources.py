"""Input folders of :class:`~lightly_cotap.data.CopyPasteScenes` from Debian packages.

:func:`tuxpaint_class_folders` and :func:`debian_backgrounds` build the two input
folders from Debian's ``tuxpaint-stamps-default`` photo stamps and the photographic
wallpapers of ``mate-backgrounds`` / ``plasma-workspace-wallpapers`` (see
``benchmarks/prepare_copy_paste_scenes.py``). Those files are GPL / LGPL / CC-BY-SA:
fetch them at setup time, do not vendor them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from lightly_cotap.atomic_write import save_image

#: The 7 Tux Paint stamp classes and their stamp folders (label = position + 1).
TUXPAINT_CLASSES: dict[str, tuple[str, ...]] = {
    "mammal": ("animals/mammals", "animals/marsupials"),
    "bird": ("animals/birds",),
    "other_animal": (
        "animals/fish",
        "animals/insects",
        "animals/amphibians",
        "animals/shellfish",
    ),
    "plant": ("plants",),
    "food": ("food",),
    "vehicle": ("vehicles", "military/vehicles"),
    "object": ("household", "hobbies", "medical", "clothes", "sports"),
}

#: Photographic wallpapers of ``plasma-workspace-wallpapers`` without salient objects.
PLASMA_PHOTOS: tuple[str, ...] = (
    "BytheWater",
    "ColdRipple",
    "DarkestHour",
    "EveningGlow",
    "FallenLeaf",
    "Grey",
    "Kite",
    "Path",
    "summer_1am",
)


def alpha_cutout(
    image: Image.Image,
    *,
    min_side: int = 32,
    foreground_range: tuple[float, float] = (0.03, 0.97),
    alpha_threshold: int = 128,
) -> Image.Image | None:
    """The image as RGBA if it is a cut-out with a real alpha channel, else None.

    Accepts photos and clip-art: RGBA / LA / PA images and palette or RGB images
    with a transparent colour.

    Args:
        image: Candidate cut-out.
        min_side: Minimum width and height.
        foreground_range: Open interval for the fraction of opaque pixels (no empty
            or fully opaque "cut-outs").
        alpha_threshold: Alpha above which a pixel is opaque.

    Returns:
        The RGBA image, or None if the image is not such a cut-out.
    """
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if not has_alpha or min(image.size) < min_side:
        return None
    rgba = image.convert("RGBA")
    fraction = float((np.asarray(rgba.getchannel("A")) > alpha_threshold).mean())
    if not foreground_range[0] < fraction < foreground_range[1]:
        return None
    return rgba


def is_photo_cutout(
    image: Image.Image,
    *,
    min_side: int = 64,
    foreground_range: tuple[float, float] = (0.03, 0.97),
    min_colors: int = 1000,
    alpha_threshold: int = 128,
) -> bool:
    """Photo filter of the Tux Paint recipe: RGBA, real cut-out, many colours.

    Args:
        image: Candidate cut-out.
        min_side: Minimum width and height.
        foreground_range: Open interval for the fraction of opaque pixels.
        min_colors: Minimum number of distinct RGB colours among opaque pixels (drops
            flat clip-art).
        alpha_threshold: Alpha above which a pixel is opaque.

    Returns:
        Whether the image passes.
    """
    if image.mode != "RGBA":
        return False
    cutout = alpha_cutout(
        image,
        min_side=min_side,
        foreground_range=foreground_range,
        alpha_threshold=alpha_threshold,
    )
    if cutout is None:
        return False
    arr = np.asarray(cutout)
    opaque = arr[..., 3] > alpha_threshold
    rgb = arr[..., :3][opaque].astype(np.int64)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    return int(np.unique(packed).size) >= min_colors


def tuxpaint_class_folders(
    stamps_root: str | Path,
    out_root: str | Path,
    *,
    classes: Mapping[str, Sequence[str]] = TUXPAINT_CLASSES,
    progress: bool = True,
    **filter_kwargs: Any,
) -> dict[str, int]:
    """Copies the photographic Tux Paint stamps into one folder per class.

    Walks ``usr/share/tuxpaint/stamps`` of Debian's ``tuxpaint-stamps-default``; a
    stamp belongs to a class if its path starts with one of the class's folders, it is
    not under a ``cartoon`` folder, and it passes :func:`is_photo_cutout`. Files are
    written as ``out_root/<class>/<relative path with '/' -> '__'>.png``.

    Args:
        stamps_root: The ``stamps`` folder.
        out_root: Output folder of class sub-folders.
        classes: Class name -> stamp folders (relative to ``stamps_root``).
        progress: Show a tqdm progress bar.
        **filter_kwargs: Passed to :func:`is_photo_cutout`.

    Returns:
        Number of cut-outs per class.

    Raises:
        ValueError: If ``stamps_root`` is not a folder.
    """
    stamps_root, out_root = Path(stamps_root), Path(out_root)
    if not stamps_root.is_dir():
        raise ValueError(f"stamps_root {str(stamps_root)!r} is not a folder.")
    counts = {name: 0 for name in classes}
    files = sorted(stamps_root.rglob("*.png"))
    for path in tqdm(files, desc="stamps", disable=not progress):
        rel = path.relative_to(stamps_root).as_posix()
        if "cartoon" in rel.lower():
            continue
        name = next(
            (
                cls
                for cls, prefixes in classes.items()
                if any(rel.startswith(p.rstrip("/") + "/") for p in prefixes)
            ),
            None,
        )
        if name is None:
            continue
        with Image.open(path) as image:
            if not is_photo_cutout(image, **filter_kwargs):
                continue
            target = out_root / name / (rel[: -len(".png")].replace("/", "__") + ".png")
            save_image(image, target)
        counts[name] += 1
    return counts


def debian_backgrounds(
    debian_root: str | Path,
    out_dir: str | Path,
    *,
    plasma_photos: Sequence[str] = PLASMA_PHOTOS,
    plasma_resolution: str = "1920x1080",
    max_side: int | None = 1024,
) -> list[Path]:
    """Collects the photographic Debian wallpapers as background photos.

    Takes ``usr/share/backgrounds/mate/nature/*.jpg`` (``mate-backgrounds``) and the
    listed ``usr/share/wallpapers/<name>/contents/images/<resolution>.jpg``
    (``plasma-workspace-wallpapers``) below ``debian_root`` (a ``dpkg -x`` target),
    downscaled to ``max_side`` and saved as JPEG (quality 95).

    Args:
        debian_root: Folder the packages were extracted into.
        out_dir: Output folder.
        plasma_photos: Plasma wallpaper names to use.
        plasma_resolution: Plasma image variant.
        max_side: Longest side of the saved photos (``None``: keep).

    Returns:
        The written files (missing sources are skipped).
    """
    debian_root, out_dir = Path(debian_root), Path(out_dir)
    sources = sorted((debian_root / "usr/share/backgrounds/mate/nature").glob("*.jpg"))
    sources += [
        p
        for name in plasma_photos
        if (
            p := debian_root
            / f"usr/share/wallpapers/{name}/contents/images/{plasma_resolution}.jpg"
        ).is_file()
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sources:
        prefix = "mate" if "backgrounds/mate" in src.as_posix() else "plasma"
        name = src.stem if prefix == "mate" else src.parents[2].name
        with Image.open(src) as raw:
            image = raw.convert("RGB")
        if max_side is not None and max(image.size) > max_side:
            scale = max_side / max(image.size)
            image = image.resize(
                (round(image.width * scale), round(image.height * scale)),
                Image.Resampling.BILINEAR,
            )
        target = out_dir / f"{prefix}_{name}.jpg"
        save_image(image, target, quality=95)
        written.append(target)
    return written
