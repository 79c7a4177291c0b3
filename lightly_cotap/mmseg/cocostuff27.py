"""COCO-Stuff-27: the curated 27-class coarse split of COCO-Stuff [0].

Dense self-supervised papers (IIC [1], PiCIE, STEGO [2], CoTAP [3], ...) evaluate
on COCO-Stuff with the 182 fine labels merged into the 27 coarse categories of
the COCO-Stuff label hierarchy (12 "things" + 15 "stuff" super-categories).
This module is the single copy of that mapping (taken from STEGO's data
loader) and a converter that writes mmseg-style label maps:

    python -m lightly_cotap.mmseg.convert_cocostuff27 data/coco_stuff164k/annotations

reads every raw COCO-Stuff label map ``<id>.png`` (values 0-181 = COCO ids - 1,
255 = unlabeled) below the folder and writes ``<id>_labelTrainIds27.png`` next
to it (0-26, 255 = ignore). The configs in ``mmseg_configs/`` then read the
images listed in STEGO's curated split files
``curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse.txt`` (49,629 / 2,175
images) with :class:`~lightly_cotap.mmseg.datasets.COCOStuff27Dataset`.

- [0]: Caesar et al., COCO-Stuff: Thing and Stuff Classes in Context, 2018,
  https://arxiv.org/abs/1612.03716
- [1]: Ji et al., Invariant Information Clustering, 2019,
  https://arxiv.org/abs/1807.06653
- [2]: Hamilton et al., Unsupervised Semantic Segmentation by Distilling Feature
  Correspondences (STEGO), 2022, https://arxiv.org/abs/2203.08414
- [3]: Wen et al., Semantic Concentration for Self-Supervised Dense
  Representations Learning, 2025, https://arxiv.org/abs/2509.09429
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from tqdm import tqdm

from lightly_cotap.atomic_write import save_image

#: Names of the 27 coarse classes, by coarse id (0-11 things, 12-26 stuff).
COARSE_CLASSES: tuple[str, ...] = (
    "electronic",
    "appliance",
    "food-things",
    "furniture-things",
    "indoor",
    "kitchen",
    "accessory",
    "animal",
    "outdoor",
    "person",
    "sports",
    "vehicle",
    "ceiling",
    "floor",
    "food-stuff",
    "furniture-stuff",
    "rawmaterial",
    "textile",
    "wall",
    "window",
    "building",
    "ground",
    "plant",
    "sky",
    "solid",
    "structural",
    "water",
)

#: Coarse id of every fine COCO-Stuff label 0-181 (fine label = COCO id - 1).
FINE_TO_COARSE: tuple[int, ...] = (
    # things 0-90 (COCO ids 1-91, including the 11 unused ids)
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7,  # 0-19
    7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10,  # 20-39
    10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2,  # 40-59
    2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1,  # 60-79
    1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4,  # 80-90
    # stuff 91-181 (COCO ids 92-182)
    17, 17, 22, 20, 20, 22, 15, 25, 16,  # 91-99
    13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26,  # 100-119
    14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21,  # 120-139
    17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24,  # 140-159
    15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18, 18, 18, 26, 26, 19,  # 160-179
    19, 24,  # 180-181
)  # fmt: skip

NUM_FINE_CLASSES = 182
IGNORE_INDEX = 255
LABEL_SUFFIX = "_labelTrainIds27.png"


def coarse_palette() -> list[list[int]]:
    """PASCAL-VOC colour map for the 27 coarse classes (as STEGO plots them).

    Returns:
        One ``[r, g, b]`` colour per coarse class.
    """
    palette = []
    for index in range(len(COARSE_CLASSES)):
        color = [0, 0, 0]
        value = index
        for shift in reversed(range(8)):
            for channel in range(3):
                color[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        palette.append(color)
    return palette


def fine_to_coarse_lut() -> NDArray[np.uint8]:
    """Look-up table from raw label value (0-255) to coarse id or 255.

    Returns:
        The table. Shape: (256,).
    """
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[:NUM_FINE_CLASSES] = np.asarray(FINE_TO_COARSE, dtype=np.uint8)
    return lut


def convert_label_map(fine: NDArray[np.integer]) -> NDArray[np.uint8]:
    """Maps a raw COCO-Stuff label map to the 27 coarse classes.

    Args:
        fine: Fine labels 0-181, 255 = unlabeled. Shape: (H, W).

    Returns:
        Coarse labels 0-26, 255 = ignore. Shape: (H, W), dtype uint8.

    Raises:
        ValueError: If the map is not 2D or holds values outside 0-181 and 255.
    """
    if fine.ndim != 2:
        raise ValueError(f"fine must be a 2D label map, got shape {fine.shape}.")
    bad = (fine < 0) | ((fine >= NUM_FINE_CLASSES) & (fine != IGNORE_INDEX))
    if bool(bad.any()):
        values = np.unique(fine[bad])[:10].tolist()
        raise ValueError(
            f"fine holds values outside 0-{NUM_FINE_CLASSES - 1} and "
            f"{IGNORE_INDEX}: {values}. Is this a raw COCO-Stuff 164k label map "
            "(stuffthingmaps_trainval2017)?"
        )
    converted: NDArray[np.uint8] = fine_to_coarse_lut()[fine.astype(np.int64)]
    return converted


def _convert_file(src: str) -> str:
    dst = src[: -len(".png")] + LABEL_SUFFIX
    with Image.open(src) as image:
        fine = np.asarray(image)
    save_image(Image.fromarray(convert_label_map(fine)), dst)
    return dst


def convert_folder(root: str | os.PathLike[str], nproc: int = 1) -> list[str]:
    """Converts every raw label map ``*.png`` below ``root`` (recursively).

    Files that already end in ``_labelTrainIds*.png`` are skipped. Each output
    is written next to its input as ``<id>_labelTrainIds27.png``.

    Args:
        root: Folder with raw COCO-Stuff 164k label maps.
        nproc: Number of worker processes.

    Returns:
        The paths of the written label maps.

    Raises:
        FileNotFoundError: If ``root`` is not a folder.
        ValueError: If it holds no raw label maps, or ``nproc`` < 1.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}.")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"Label folder not found: {root}")
    sources = sorted(
        str(p) for p in Path(root).rglob("*.png") if "_labelTrainIds" not in p.name
    )
    if not sources:
        raise ValueError(f"No raw label maps (*.png) found below {root}.")
    if nproc == 1:
        return [_convert_file(s) for s in tqdm(sources, desc="COCO-Stuff-27")]
    with ProcessPoolExecutor(nproc) as pool:
        return list(
            tqdm(
                pool.map(_convert_file, sources, chunksize=64),
                total=len(sources),
                desc="COCO-Stuff-27",
            )
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point of the converter.

    Args:
        argv: Command line arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m lightly_cotap.mmseg.convert_cocostuff27",
        description="Convert raw COCO-Stuff 164k label maps (0-181) to the 27 "
        "coarse classes used by dense SSL papers; writes <id>"
        f"{LABEL_SUFFIX} next to every <id>.png.",
    )
    parser.add_argument("root", help="e.g. data/coco_stuff164k/annotations")
    parser.add_argument("--nproc", type=int, default=4)
    args = parser.parse_args(argv)
    written = convert_folder(args.root, nproc=args.nproc)
    print(f"Wrote {len(written)} label maps.")
