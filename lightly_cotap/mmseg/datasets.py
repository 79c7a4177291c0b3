"""mmseg datasets that mmsegmentation does not ship."""

from __future__ import annotations

from typing import Any

from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS

from lightly_cotap.mmseg.cocostuff27 import (
    COARSE_CLASSES,
    LABEL_SUFFIX,
    coarse_palette,
)


@DATASETS.register_module()
class COCOStuff27Dataset(BaseSegDataset):  # type: ignore[misc]
    """COCO-Stuff with the 27 coarse classes used by dense SSL papers [0].

    Images ``<id>.jpg`` and label maps ``<id>_labelTrainIds27.png`` (written by
    ``python -m lightly_cotap.mmseg.convert_cocostuff27``; values 0-26, 255 = ignore).
    Set ``ann_file`` to STEGO's curated list
    (``curated/train2017/Coco164kFull_Stuff_Coarse.txt``) for the curated split,
    or leave it empty to use every image of the folder.

    - [0]: Hamilton et al., Unsupervised Semantic Segmentation by Distilling
      Feature Correspondences (STEGO), 2022, https://arxiv.org/abs/2203.08414
    """

    METAINFO = dict(classes=COARSE_CLASSES, palette=coarse_palette())

    def __init__(
        self,
        img_suffix: str = ".jpg",
        seg_map_suffix: str = LABEL_SUFFIX,
        **kwargs: Any,
    ) -> None:
        """Initializes the dataset.

        Args:
            img_suffix: Suffix of the image files.
            seg_map_suffix: Suffix of the converted 27-class label maps.
            **kwargs: Further ``BaseSegDataset`` arguments (``data_root``, ...).
        """
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix, **kwargs)
