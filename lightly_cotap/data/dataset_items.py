"""Helpers for the items of map-style image datasets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor


def item_image(item: Any) -> Any:
    """Returns the image of a dataset item.

    ``(image, target)`` (torchvision), ``(image, target, filename)`` (LightlyDataset)
    and bare images are supported.

    Args:
        item: What the dataset's ``__getitem__`` returned.

    Returns:
        The image (the first element of a tuple or list, else the item itself).

    Raises:
        ValueError: If the item is an empty tuple or list.
    """
    if isinstance(item, (tuple, list)):
        if len(item) == 0:
            raise ValueError("dataset returned an empty tuple; expected an image.")
        return item[0]
    return item


def to_numpy(array: np.ndarray | Tensor | Sequence[Any]) -> np.ndarray:
    """Converts a tensor (detached, on the CPU), array or nested sequence to NumPy.

    Args:
        array: The values.

    Returns:
        The values as a NumPy array.
    """
    if isinstance(array, Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)
