from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lightly_cotap.data.background_views import BackgroundView, procedural_texture
from lightly_cotap.data.copy_paste_scenes import CopyPasteScenes


def _photo() -> Image.Image:
    # Left half red, right half blue: a crop's position shows in its colours.
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :100, 0] = 255
    arr[:, 100:, 2] = 255
    return Image.fromarray(arr)


def test_draw_is_deterministic_and_within_the_photo() -> None:
    views = [
        BackgroundView.draw(np.random.default_rng(i), (200, 100)) for i in range(50)
    ]
    again = [
        BackgroundView.draw(np.random.default_rng(i), (200, 100)) for i in range(50)
    ]
    assert views == again
    textures = sum(v.texture_seed is not None for v in views)
    assert 10 < textures < 40
    for v in views:
        x0, y0, x1, y1 = v.crop
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        # Square in pixels, side within 20-100% of the short side (100 px).
        side_x, side_y = (x1 - x0) * 200, (y1 - y0) * 100
        assert side_x == pytest.approx(side_y)
        assert 20 - 1e-6 <= side_y <= 100 + 1e-6


def test_render_applies_crop_and_augmentations() -> None:
    plain: dict[str, Any] = dict(
        texture_seed=None,
        flip=False,
        rotation=0,
        color=1.0,
        brightness=1.0,
        contrast=1.0,
        grayscale=False,
    )
    left = BackgroundView(crop=(0.0, 0.0, 0.25, 0.5), **plain).render(_photo(), 32)
    right = BackgroundView(crop=(0.75, 0.5, 1.0, 1.0), **plain).render(_photo(), 32)
    assert left.size == (32, 32) and left.mode == "RGB"
    assert np.asarray(left)[..., 0].min() == 255 and np.asarray(left)[..., 2].max() == 0
    assert np.asarray(right)[..., 2].min() == 255
    # The full photo mirrored puts blue on the left.
    full = (0.0, 0.0, 1.0, 1.0)
    mirrored = BackgroundView(crop=full, **{**plain, "flip": True}).render(_photo(), 32)
    assert np.asarray(mirrored)[:, :8, 2].min() == 255
    gray = BackgroundView(crop=full, **{**plain, "grayscale": True}).render(
        _photo(), 32
    )
    arr = np.asarray(gray).astype(int)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_texture_is_seeded_and_spans_the_range() -> None:
    a = np.asarray(procedural_texture(48, np.random.default_rng(1)))
    b = np.asarray(procedural_texture(48, np.random.default_rng(1)))
    c = np.asarray(procedural_texture(48, np.random.default_rng(2)))
    assert a.shape == (48, 48, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() == 0 and a.max() == 255


def _scenes(inputs: tuple[Path, Path], **kwargs: Any) -> CopyPasteScenes:
    defaults: dict[str, Any] = dict(
        num_samples=20, image_size=64, max_background_side=256
    )
    return CopyPasteScenes(*inputs, **{**defaults, **kwargs})


def test_augmented_backgrounds_keep_masks_and_plain_layouts(
    copy_paste_inputs: tuple[Path, Path],
) -> None:
    plain = _scenes(copy_paste_inputs, seed=5)
    augmented = _scenes(copy_paste_inputs, seed=5, augment_backgrounds=True)
    colour_backgrounds = 0
    for i in range(len(plain)):
        a, b = plain.layout(i), augmented.layout(i)
        assert a.background_view is None and b.background_view is not None
        # Objects are drawn from the same stream: only the background changes.
        assert a.objects == b.objects and a.background == b.background
        (image_a, mask_a), (image_b, mask_b) = plain.render(a), augmented.render(b)
        assert np.array_equal(mask_a, mask_b)
        bg = mask_b == 0
        arr = np.asarray(image_b).astype(int)
        # The test backgrounds are grey photos: colour off the objects comes from
        # the procedural textures.
        colour = (arr[..., 0] != arr[..., 1]) | (arr[..., 1] != arr[..., 2])
        colour_backgrounds += int(colour[bg].mean() > 0.5)
        assert not np.array_equal(np.asarray(image_a)[bg], arr[bg])
    assert 0 < colour_backgrounds < len(plain)


def test_center_jitter_places_objects_near_the_centre(
    copy_paste_inputs: tuple[Path, Path],
) -> None:
    scenes = _scenes(
        copy_paste_inputs,
        num_samples=40,
        num_objects=(1, 1),
        object_scale=(0.55, 0.85),
        center_jitter=0.1,
    )
    for i in range(len(scenes)):
        (obj,) = scenes.layout(i).objects
        x0, y0, x1, y1 = obj.box
        assert 0 <= x0 and x1 <= 64 and 0 <= y0 and y1 <= 64
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        assert abs(cx - 32) <= 0.1 * 64 + 1 and abs(cy - 32) <= 0.1 * 64 + 1
    with pytest.raises(ValueError, match="center_jitter"):
        _scenes(copy_paste_inputs, center_jitter=0.7)
