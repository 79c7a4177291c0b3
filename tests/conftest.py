from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

# Real photos shipped with scikit-image (CC0 / public domain) for copy-paste scenes.
OBJECT_PHOTOS = {"cat": "chelsea", "cup": "coffee", "rocket": "rocket"}
GRAY_BACKGROUNDS = ("camera", "brick", "grass", "gravel", "moon", "coins")


@pytest.fixture(autouse=True)
def _single_torch_thread() -> Iterator[None]:
    """Runs every test on one intra-op thread.

    The suite runs with ``pytest -n 2`` on 2 cores: one torch thread per worker avoids
    oversubscription, which made small trainings up to ~30x slower.
    """
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def _cutout(
    photo: np.ndarray, box: tuple[int, int, int, int], soft: bool
) -> Image.Image:
    """RGBA cut-out of a photo crop with a notched elliptical alpha mask."""
    x0, y0, x1, y1 = box
    rgb = photo[y0:y1, x0:x1]
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r = ((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2
    r[: h // 2, int(0.6 * w) :] = 2.0  # notch: asymmetric, so flips are visible
    if soft:
        alpha = np.clip((1.05 - r) / 0.1, 0, 1) * 255  # soft rim, half below 128
    else:
        alpha = (r <= 1.0) * 255
    return Image.fromarray(np.dstack([rgb, alpha.astype(np.uint8)]))


@pytest.fixture(scope="session")
def copy_paste_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(objects, backgrounds)`` folders for CopyPasteScenes made of real photos.

    Three classes of three RGBA cut-outs each (the last one with a soft alpha rim)
    and six grey background photos.
    """
    root = tmp_path_factory.mktemp("copy_paste")
    objects, backgrounds = root / "objects", root / "backgrounds"
    for name, photo_name in OBJECT_PHOTOS.items():
        photo = getattr(skimage.data, photo_name)()
        h, w = photo.shape[:2]
        (objects / name).mkdir(parents=True)
        boxes = [
            (0, 0, w // 2, h // 2),
            (w // 3, h // 4, w, h),
            (w // 4, 0, 3 * w // 4, h),
        ]
        for i, box in enumerate(boxes):
            _cutout(photo, box, soft=i == 2).save(objects / name / f"{name}{i}.png")
    backgrounds.mkdir()
    for name in GRAY_BACKGROUNDS:
        Image.fromarray(getattr(skimage.data, name)()).save(backgrounds / f"{name}.png")
    return objects, backgrounds


#: scikit-image photos of the brightness segmentation set, per split.
BRIGHTNESS_PHOTOS = {
    "train": ["astronaut", "chelsea", "coffee", "rocket"],
    "val": ["immunohistochemistry", "hubble_deep_field"],
}


@pytest.fixture(scope="session")
def brightness_segmentation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photos + 3-class brightness masks in ``images/`` + ``masks/`` folders.

    ``images/{train,val}/<name>.jpg`` (96 px short side) and
    ``masks/{train,val}/<name>.png``: the class of a pixel is the tercile of the
    blurred grey value in its image (0 dark, 1 medium, 2 bright), with a 2-pixel
    ignore (255) border. Read-only: copy it to change it.
    """
    from scipy.ndimage import gaussian_filter

    root = tmp_path_factory.mktemp("brightness")
    for split, names in BRIGHTNESS_PHOTOS.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for name in names:
            image = Image.fromarray(getattr(skimage.data, name)()[..., :3])
            scale = 96 / min(image.size)
            image = image.resize(
                (round(image.width * scale), round(image.height * scale)),
                Image.Resampling.BILINEAR,
            )
            image.save(root / "images" / split / f"{name}.jpg")
            grey = gaussian_filter(np.asarray(image.convert("L"), np.float64), 2.0)
            mask = np.digitize(grey, np.quantile(grey, [1 / 3, 2 / 3])).astype(np.uint8)
            mask[:2], mask[-2:], mask[:, :2], mask[:, -2:] = 255, 255, 255, 255
            Image.fromarray(mask).save(root / "masks" / split / f"{name}.png")
    return root


_mm_logger_names = itertools.count()


class MMLogCapture(logging.Handler):
    """Collects the records of an MMLogger."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int) -> list[str]:
        """The messages logged at ``level``."""
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def mm_log() -> Iterator[MMLogCapture]:
    """What mmengine's ``print_log(logger="current")`` logs during a test.

    A fresh MMLogger becomes the current one (as a Runner's does) and collects
    every record it handles.
    """
    pytest.importorskip("mmengine")
    from mmengine.logging import MMLogger

    logger = MMLogger.get_instance(
        f"test-{next(_mm_logger_names)}", log_level="WARNING"
    )
    capture = MMLogCapture()
    logger.addHandler(capture)
    yield capture
    logger.removeHandler(capture)
