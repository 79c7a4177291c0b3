from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lightly_cotap.transforms.bagssl_transform import (
    BagSSLTransform,
    BagSSLViewTransform,
)


def _image(h: int = 60, w: int = 80, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_default_views() -> None:
    views = BagSSLTransform(n_patches=5, image_size=64)(_image())
    assert len(views) == 5
    assert all(v.shape == (3, 32, 32) and v.dtype == torch.float32 for v in views)


def test_patches_are_fixed_size_crops_of_the_resized_image() -> None:
    image = _image()
    transform = BagSSLTransform(
        n_patches=4,
        patch_size=8,
        image_size=None,
        cj_prob=0.0,
        random_gray_scale=0.0,
        solarize_prob=0.0,
        gaussian_blur=0.0,
        hf_prob=0.0,
        normalize=None,
    )
    full = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    patches = transform(image)
    assert len({tuple(p.flatten()[:5].tolist()) for p in patches}) > 1  # random
    for patch in patches:
        assert isinstance(patch, torch.Tensor) and patch.shape == (3, 8, 8)
        windows = full.unfold(1, 8, 1).unfold(2, 8, 1)  # (3, H-7, W-7, 8, 8)
        diff = (windows - patch[:, None, None]).abs().amax(dim=(0, 3, 4))
        assert diff.min() < 1e-6  # the patch occurs in the image


def test_input_size_and_patch_scale() -> None:
    view = BagSSLViewTransform(patch_size=16, image_size=48, input_size=24)
    assert view(_image()).shape == (3, 24, 24)
    view = BagSSLViewTransform(patch_size=None, patch_scale=0.25, input_size=20)
    assert view(_image()).shape == (3, 20, 20)
    # Patches bigger than a small image are padded, not failing.
    view = BagSSLViewTransform(patch_size=32, image_size=None)
    assert view(_image(h=20, w=25)).shape == (3, 32, 32)


def test_bad_args() -> None:
    with pytest.raises(ValueError, match="n_patches"):
        BagSSLTransform(n_patches=0)
    with pytest.raises(ValueError, match="exactly one"):
        BagSSLViewTransform(patch_size=None)
    with pytest.raises(ValueError, match="exactly one"):
        BagSSLViewTransform(patch_size=16, patch_scale=0.2, input_size=16)
    with pytest.raises(ValueError, match="patch_size"):
        BagSSLViewTransform(patch_size=64, image_size=32)
    with pytest.raises(ValueError, match="patch_scale"):
        BagSSLViewTransform(patch_size=None, patch_scale=1.5, input_size=16)
    with pytest.raises(ValueError, match="input_size"):
        BagSSLViewTransform(patch_size=None, patch_scale=0.5)
    with pytest.raises(ValueError, match="image_size"):
        BagSSLViewTransform(image_size=0)
