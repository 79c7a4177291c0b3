from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("mmseg")

from lightly_cotap.mmseg import cocostuff27  # noqa: E402
from lightly_cotap.mmseg.cocostuff27 import (  # noqa: E402
    COARSE_CLASSES,
    FINE_TO_COARSE,
    convert_folder,
    convert_label_map,
)

# (fine label = COCO id - 1, fine name, coarse name) from the COCO-Stuff hierarchy.
KNOWN = [
    (0, "person", "person"),
    (2, "car", "vehicle"),
    (16, "cat", "animal"),
    (43, "bottle", "kitchen"),
    (52, "banana", "food-things"),
    (61, "chair", "furniture-things"),
    (71, "tv", "electronic"),
    (77, "microwave", "appliance"),
    (83, "book", "indoor"),
    (100, "carpet", "floor"),
    (105, "clouds", "sky"),
    (112, "fence", "structural"),
    (147, "river", "water"),
    (168, "tree", "plant"),
    (175, "wall-wood", "wall"),
    (180, "window-other", "window"),
    (181, "wood", "solid"),
]


def test_mapping_table() -> None:
    assert len(FINE_TO_COARSE) == 182
    assert len(COARSE_CLASSES) == 27
    assert set(FINE_TO_COARSE) == set(range(27))
    # things (fine 0-90) map to the 12 thing categories, stuff to the 15 others
    assert max(FINE_TO_COARSE[:91]) == 11
    assert min(FINE_TO_COARSE[91:]) == 12
    for fine, _, coarse in KNOWN:
        assert COARSE_CLASSES[FINE_TO_COARSE[fine]] == coarse
    assert len(cocostuff27.coarse_palette()) == 27


def test_convert_label_map() -> None:
    fine = np.array([[0, 2, 255], [181, 105, 112]], dtype=np.uint8)
    expected = np.array([[9, 11, 255], [24, 23, 25]], dtype=np.uint8)
    np.testing.assert_array_equal(convert_label_map(fine), expected)
    with pytest.raises(ValueError, match="outside"):
        convert_label_map(np.array([[182, 0]], dtype=np.uint8))
    with pytest.raises(ValueError, match="2D"):
        convert_label_map(np.zeros((2, 2, 3), dtype=np.uint8))


def test_convert_folder(tmp_path: Path) -> None:
    split = tmp_path / "train2017"
    split.mkdir()
    rng = np.random.default_rng(0)
    fine = rng.integers(0, 182, size=(12, 9)).astype(np.uint8)
    fine[0, :3] = 255
    Image.fromarray(fine).save(split / "000001.png")
    written = convert_folder(tmp_path)
    assert written == [str(split / "000001_labelTrainIds27.png")]
    coarse = np.asarray(Image.open(written[0]))
    np.testing.assert_array_equal(
        coarse,
        np.asarray(FINE_TO_COARSE)[fine.clip(0, 181)] * (fine != 255)
        + 255 * (fine == 255),
    )
    # converted files are skipped on a second run
    assert convert_folder(tmp_path) == written
    with pytest.raises(FileNotFoundError):
        convert_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="nproc"):
        convert_folder(tmp_path, nproc=0)


def test_command_line_with_worker_processes(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        Image.fromarray(np.full((4, 5), 168, dtype=np.uint8)).save(
            tmp_path / f"{name}.png"
        )
    cocostuff27.main([str(tmp_path), "--nproc", "2"])
    for name in ("a", "b", "c"):
        coarse = np.asarray(Image.open(tmp_path / f"{name}_labelTrainIds27.png"))
        assert (coarse == COARSE_CLASSES.index("plant")).all()
