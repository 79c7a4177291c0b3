from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from lightly_cotap.data.image_io import to_rgb
from lightly_cotap.data.segmentation_folder import SegmentationFolder, image_to_tensor


def _write(root: Path) -> tuple[Path, Path, np.ndarray]:
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    photo = skimage.data.chelsea()[:96, :128]
    mask = np.zeros((96, 128), np.uint8)
    mask[20:60, 30:90] = 1
    mask[:, :8] = 255  # ignore
    Image.fromarray(photo).save(images / "b.png")
    Image.fromarray(photo[::-1].copy()).save(images / "a.jpg")
    Image.fromarray(mask).save(masks / "b.png")
    palette = Image.frombytes("P", (128, 96), mask[::-1].tobytes())
    palette.putpalette([0, 0, 0, 128, 0, 0] + [255, 255, 255] * 254)
    palette.save(masks / "a.png")
    (images / "notes.txt").write_text("not an image")
    return images, masks, mask


def test_pairs_by_stem_and_keeps_labels(tmp_path: Path) -> None:
    images, masks, mask = _write(tmp_path)
    data = SegmentationFolder(images, masks, image_size=None)
    assert [p[0].name for p in data.samples] == ["a.jpg", "b.png"]
    image, label = data[1]
    assert image.shape == (3, 96, 128) and image.dtype == torch.float32
    assert torch.equal(label, torch.from_numpy(mask).long())
    # Palette masks are read as their indices.
    assert torch.equal(data[0][1], torch.from_numpy(mask[::-1].copy()).long())
    # Default normalisation is ImageNet's.
    ref = image_to_tensor(
        Image.open(images / "b.png"),
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
    )
    torch.testing.assert_close(image, ref)


def test_resizes_image_bilinear_and_mask_nearest(tmp_path: Path) -> None:
    images, masks, _ = _write(tmp_path)
    data = SegmentationFolder(images, masks, image_size=(48, 40))
    image, label = data[1]
    assert image.shape == (3, 48, 40) and label.shape == (48, 40)
    assert set(label.unique().tolist()) == {0, 1, 255}


def test_errors(tmp_path: Path) -> None:
    images, masks, _ = _write(tmp_path)
    (masks / "a.png").unlink()
    with pytest.raises(ValueError, match="have no mask"):
        SegmentationFolder(images, masks)
    with pytest.raises(ValueError, match="does not exist"):
        SegmentationFolder(tmp_path / "nope", masks)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        SegmentationFolder(empty, masks)
    with pytest.raises(ValueError, match="image_size"):
        SegmentationFolder(images, images, image_size=0)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_image_to_tensor_is_the_normalisation_formula(mode: str) -> None:
    rgb = skimage.data.chelsea()[:20, :30]
    image = Image.fromarray(rgb).convert(mode)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    x = image_to_tensor(image, mean=mean, std=std)
    # Reference: float32 RGB (image_io.to_rgb) in [0, 1], then (x - mean) / std per
    # channel; the same float32 operations, bit for bit.
    scaled = np.asarray(to_rgb(image), dtype=np.float32) / np.float32(255.0)
    expected = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    assert x.dtype == torch.float32 and x.shape == (3, 20, 30)
    assert torch.equal(x, torch.from_numpy(expected).permute(2, 0, 1))
