"""Images are read as correct 8-bit RGB whatever their mode, in train and eval."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from lightly_cotap.data.image_folder import ImageFolderDataset, list_image_files
from lightly_cotap.data.image_io import (
    ALPHA_BACKGROUND,
    UnreadableImageError,
    image_problem,
    read_rgb_image,
    to_rgb,
)
from lightly_cotap.data.segmentation_folder import SegmentationFolder, image_to_tensor

GREY16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520


def _grey8(grey16: np.ndarray) -> np.ndarray:
    return np.rint(grey16 / 257.0).astype(np.uint8)


def _png16_rgb(path: Path, rgb: np.ndarray) -> None:
    """Writes a 16-bit-per-channel RGB PNG (Pillow cannot write one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    h, w, _ = rgb.shape
    big_endian = rgb.astype(">u2")
    raw = b"".join(b"\x00" + big_endian[i].tobytes() for i in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "grey16.png"
    Image.fromarray(GREY16).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(read_rgb_image(path))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], _grey8(GREY16))
    # Pillow's own conversion clips everything above 255 to white.
    assert np.asarray(Image.open(path).convert("RGB")).mean() > 250
    assert abs(rgb.mean() - GREY16.mean() / 257) < 0.6


def test_32_bit_and_float_grey(tmp_path: Path) -> None:
    path = tmp_path / "grey32.tif"
    Image.fromarray(GREY16.astype(np.int32)).save(path)
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(
        np.asarray(read_rgb_image(path))[..., 0], _grey8(GREY16)
    )
    floats = (GREY16 / 65535.0).astype(np.float32)
    image = Image.fromarray(floats)
    assert image.mode == "F"
    np.testing.assert_array_equal(
        np.asarray(to_rgb(image))[..., 1], np.rint(floats * 255).astype(np.uint8)
    )


def test_16_bit_rgb_png(tmp_path: Path) -> None:
    rgb16 = np.stack([GREY16, GREY16 // 2, 65535 - GREY16], axis=-1)
    _png16_rgb(tmp_path / "rgb16.png", rgb16)
    rgb = np.asarray(read_rgb_image(tmp_path / "rgb16.png")).astype(int)
    # Pillow keeps the high byte of each sample: within 1 of the scaled value.
    assert np.abs(rgb - rgb16 / 257.0).max() <= 1.0


def test_alpha_is_composited_onto_the_background() -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)  # colour stored under the alpha
    rgba[0, 0, 3] = 255  # opaque
    rgba[0, 1, 3] = 0  # transparent
    rgba[1, :, 3] = 128  # half
    out = np.asarray(to_rgb(Image.fromarray(rgba))).astype(int)
    assert out[0, 0].tolist() == [10, 200, 30]
    assert out[0, 1].tolist() == list(ALPHA_BACKGROUND)
    half = (np.array([10, 200, 30]) * 128 + np.array(ALPHA_BACKGROUND) * 127) / 255
    assert np.abs(out[1, 0] - half).max() <= 1
    la = Image.fromarray(rgba[..., [0, 3]], mode="LA")
    assert np.asarray(to_rgb(la))[0, 1].tolist() == list(ALPHA_BACKGROUND)


def test_palette_and_cmyk() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    palette.putpixel((1, 0), 1)
    assert np.asarray(to_rgb(palette)).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    palette.info["transparency"] = 1  # index 1 is transparent
    assert np.asarray(to_rgb(palette))[0, 1].tolist() == list(ALPHA_BACKGROUND)
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    assert np.asarray(to_rgb(cmyk)).tolist() == [[[255, 0, 0]]]


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    photo = Image.fromarray(skimage.data.astronaut())
    files = {
        "empty.jpg": b"",
        "text.png": b"not an image at all",
        "cut.jpg": _truncated(_encoded(photo, "JPEG")),
        "cut.png": _truncated(_encoded(photo, "PNG")),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UnreadableImageError, match=name):
            read_rgb_image(tmp_path / name)
        problem = image_problem(tmp_path / name)
        assert problem is not None and name in problem
    assert "empty file" in str(image_problem(tmp_path / "empty.jpg"))
    photo.save(tmp_path / "good.jpg")
    assert image_problem(tmp_path / "good.jpg") is None


def test_image_to_tensor_reads_16_bit_like_8_bit() -> None:
    image16 = Image.fromarray(GREY16)
    image8 = Image.fromarray(_grey8(GREY16))
    torch.testing.assert_close(image_to_tensor(image16), image_to_tensor(image8))


def test_segmentation_folder_reads_16_bit_images_and_checks_mask_size(
    tmp_path: Path,
) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(GREY16).save(images / "a.png")
    Image.fromarray(_grey8(GREY16)).save(images / "b.png")
    for stem in "ab":
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(masks / f"{stem}.png")
    data = SegmentationFolder(images, masks, image_size=32)
    torch.testing.assert_close(data[0][0], data[1][0])
    # A mask with height and width swapped is never resized to fit.
    Image.fromarray(GREY16[:32]).save(images / "c.png")  # 64 wide, 32 high
    Image.fromarray(np.zeros((64, 32), np.uint8)).save(masks / "c.png")
    data = SegmentationFolder(images, masks, image_size=32)
    with pytest.raises(ValueError, match=r"c\.png.*\(32, 64\).*\(64, 32\)"):
        data[2]


def test_image_folder_skips_unreadable_files(tmp_path: Path) -> None:
    photo = Image.fromarray(skimage.data.astronaut()).resize((64, 64))
    (tmp_path / "cats").mkdir()
    photo.save(tmp_path / "cats" / "b.jpg")
    Image.fromarray(GREY16).save(tmp_path / "a16.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".backbone.1.tmp.png").write_bytes(b"hidden temporary file")
    assert list_image_files(tmp_path) == ["a16.png", "cats/b.jpg", "empty.jpg"]
    dataset = ImageFolderDataset(tmp_path, num_threads=2)
    assert dataset.files == ["a16.png", "cats/b.jpg"]
    assert [name for name, _ in dataset.skipped] == ["empty.jpg"]
    assert "empty file" in dataset.skipped[0][1]
    image, target, name = dataset[0]
    assert (target, name) == (0, "a16.png") and image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image)[..., 0], _grey8(GREY16))
    with pytest.raises(NotADirectoryError):
        ImageFolderDataset(tmp_path / "missing")
