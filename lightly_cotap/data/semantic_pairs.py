"""Pairs of an image and a semantic positive: neighbours, curated pairs or same class.

:class:`SemanticPairDataset` wraps any map-style dataset (torchvision datasets,
``lightly.data.LightlyDataset``, :class:`~lightly_cotap.data.SampleImageDataset`,
...) and yields ``(view, view_pos, index, index_pos)``, where the positive comes from
the nearest neighbours (:class:`~lightly_cotap.data.neighbors.NeighborIndex`, CoTAP
[0]), from a curated list of index pairs, or from the same class (semantic pairs
[1]), optionally falling back to an augmented pair of x itself.
:class:`AugmentedPairDataset` is the matched baseline (two views of one image).

- [0]: CoTAP, 2025, https://arxiv.org/abs/2509.09429
- [1]: Alkhalefi et al., The Impact of Semantic Pairs on Self-Supervised
  Representation Learning, 2025, https://arxiv.org/abs/2510.08722
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightly_cotap.data.dataset_items import item_image, to_numpy
from lightly_cotap.data.neighbors import NeighborIndex

PairMode = Literal["neighbors", "pairs", "labels", "self"]
"""How :class:`SemanticPairDataset` picks the positive of an image."""


def _dataset_targets(dataset: Any) -> np.ndarray:
    """Finds the class labels of a dataset without loading its images."""
    candidates = [dataset, getattr(dataset, "dataset", None)]
    for candidate in candidates:
        if candidate is None:
            continue
        targets = getattr(candidate, "targets", None)
        if targets is None:
            continue
        targets = to_numpy(targets)
        if candidate is not dataset and hasattr(dataset, "indices"):
            targets = targets[np.asarray(dataset.indices)]  # torch Subset
        return targets
    raise ValueError(
        f"could not find labels on {type(dataset).__name__} (no 'targets' attribute "
        "on the dataset or on its '.dataset'); pass labels=..."
    )


class SemanticPairDataset(Dataset[tuple[Any, Any, int, int]]):
    """Wraps a dataset to yield pairs of an image and a semantic positive.

    Modes (how the positive ``x+`` of an image ``x`` is chosen):

    - ``"neighbors"``: uniformly from ``x``'s ``k`` nearest neighbours
      (:class:`NeighborIndex`), as in CoTAP [0]. One item per image.
    - ``"pairs"``: a curated list of index pairs ``(a, b)``, as in the semantic-pairs
      study [1]; item ``m`` is the pair ``pairs[m]``, so the length is the number of
      pairs (list both orders if the pairs should be used both ways).
    - ``"labels"``: uniformly from the other images of ``x``'s class (from
      ``labels`` or from the dataset's ``targets``). This is only an approximation
      of [1], whose pairs were curated by hand; random same-class pairs include
      poor matches. An image that is alone in its class is paired with itself (a
      warning names the number of such classes). One item per image.
    - ``"self"``: ``x`` itself, i.e. the usual augmented pair (baseline; see
      :class:`AugmentedPairDataset`).

    With probability ``p_self`` any mode falls back to ``x+ = x`` (two independent
    augmentations of one image). ``x`` goes through ``transform`` and ``x+``
    through ``transform_pos`` (``transform`` if None). The wrapped dataset should
    return un-augmented images, e.g. PIL images: ``(image, target)``
    (torchvision), ``(image, target, filename)`` (``lightly.data.LightlyDataset``,
    which also reads flat image folders) or a bare image.

    Randomness: with ``seed=None`` the positives are drawn with PyTorch's global
    RNG, which the DataLoader seeds per worker and epoch (like the augmentations).
    With an int ``seed`` the draw for item ``i`` depends only on ``(seed, epoch, i)``
    (call :meth:`set_epoch` every epoch), independent of workers and order.

    Output of ``dataset[i]``:
        Tuple ``(view, view_pos, index, index_pos)``: the transformed image and
        positive, and their indices in the wrapped dataset (``index_pos == index``
        for a self pair), so that the loss knows the pairing. With the default
        collate, the indices become int64 tensors of shape ``(B,)``.

    - [0]: CoTAP, 2025, https://arxiv.org/abs/2509.09429
    - [1]: Alkhalefi et al., The Impact of Semantic Pairs on Self-Supervised
      Representation Learning, 2025, https://arxiv.org/abs/2510.08722

    Attributes:
        dataset: The wrapped dataset.
        mode: The pairing mode.
        neighbors: The neighbour index (``"neighbors"`` mode) or None.
        pairs: The index pairs (``"pairs"`` mode), int64 array ``(M, 2)``, or None.
        labels: Class labels (``"labels"`` mode), array ``(N,)``, or None.
        p_self: Probability of a self pair.
        transform: Transform of ``x``.
        transform_pos: Transform of ``x+`` (None: ``transform``).
        seed: Seed of the positive draws, or None for PyTorch's global RNG.

    Examples:
        >>> from torch.utils.data import DataLoader
        >>> from lightly_cotap.data import (
        ...     NeighborIndex, SampleImageDataset, SemanticPairDataset
        ... )
        >>> from lightly_cotap.transforms import CoTAPTransform
        >>> base = SampleImageDataset()
        >>> index = NeighborIndex.build(base, backbone, k=3)
        >>> pairs = SemanticPairDataset(base, neighbors=index, transform=CoTAPTransform())
        >>> views, views_pos, index, index_pos = next(iter(DataLoader(pairs, 4)))
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        neighbors: NeighborIndex | np.ndarray | Tensor | None = None,
        pairs: np.ndarray | Tensor | Sequence[Sequence[int]] | None = None,
        labels: np.ndarray | Tensor | Sequence[Any] | None = None,
        mode: PairMode | None = None,
        p_self: float = 0.0,
        transform: Callable[[Any], Any] | None = None,
        transform_pos: Callable[[Any], Any] | None = None,
        seed: int | None = None,
    ) -> None:
        """Initializes the pair dataset.

        Args:
            dataset: Map-style dataset of images (see the class docstring).
            neighbors: :class:`NeighborIndex` or neighbour array ``(N, k)``.
            pairs: Curated index pairs. Shape ``(M, 2)``.
            labels: Class label of every image. Shape ``(N,)``.
            mode: ``"neighbors"``, ``"pairs"``, ``"labels"`` or ``"self"``. If None,
                inferred from which of ``neighbors``, ``pairs``, ``labels`` is given.
                ``"labels"`` without ``labels`` reads the dataset's ``targets``.
            p_self: Probability of pairing an image with itself instead.
            transform: Transform of the image ``x``.
            transform_pos: Transform of the positive ``x+``; ``transform`` if None.
            seed: Seed for the positive draws (see the class docstring).

        Raises:
            ValueError: On a mode/argument mismatch, lengths that do not match the
                dataset, indices out of range, or ``p_self`` outside ``[0, 1]``.
        """
        num_samples = len(dataset)  # type: ignore[arg-type]
        given = {
            name: value
            for name, value in (
                ("neighbors", neighbors),
                ("pairs", pairs),
                ("labels", labels),
            )
            if value is not None
        }
        if mode is None:
            if len(given) != 1:
                raise ValueError(
                    "pass exactly one of neighbors, pairs and labels, or set mode "
                    f"explicitly (got {sorted(given) or 'none'})."
                )
            mode = cast(PairMode, next(iter(given.keys())))
        if mode not in ("neighbors", "pairs", "labels", "self"):
            raise ValueError(
                f"mode must be 'neighbors', 'pairs', 'labels' or 'self' but is {mode!r}."
            )
        extra = set(given) - ({mode} if mode != "self" else set())
        if extra:
            raise ValueError(f"mode={mode!r} does not use {sorted(extra)}.")
        if not 0.0 <= p_self <= 1.0:
            raise ValueError(f"p_self must be in [0, 1] but is {p_self}.")
        if num_samples == 0:
            raise ValueError("dataset is empty.")

        self.dataset = dataset
        self.mode: PairMode = mode  # type: ignore[assignment]
        self.p_self = p_self
        self.transform = transform
        self.transform_pos = transform_pos
        self.seed = seed
        self.epoch = 0
        self.neighbors: NeighborIndex | None = None
        self.pairs: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self._class_members: list[np.ndarray] = []
        self._class_of: np.ndarray = np.zeros(0, dtype=np.int64)

        if mode == "neighbors":
            if neighbors is None:
                raise ValueError("mode='neighbors' needs neighbors=...")
            index = (
                neighbors
                if isinstance(neighbors, NeighborIndex)
                else NeighborIndex(neighbors)
            )
            index.check_length(num_samples)
            self.neighbors = index
        elif mode == "pairs":
            if pairs is None:
                raise ValueError("mode='pairs' needs pairs=...")
            self.pairs = _validate_pairs(pairs, num_samples)
        elif mode == "labels":
            label_array = (
                to_numpy(labels) if labels is not None else _dataset_targets(dataset)
            )
            if label_array.ndim != 1 or len(label_array) != num_samples:
                raise ValueError(
                    f"labels must have shape ({num_samples},) (one per image) but has "
                    f"shape {label_array.shape}."
                )
            self.labels = label_array
            _, self._class_of = np.unique(label_array, return_inverse=True)
            self._class_of = self._class_of.reshape(-1).astype(np.int64)
            order = np.argsort(self._class_of, kind="stable")
            counts = np.bincount(self._class_of)
            self._class_members = np.split(order, np.cumsum(counts)[:-1])
            singletons = int((counts == 1).sum())
            if singletons:
                warnings.warn(
                    f"{singletons} of {len(counts)} classes have a single image; those "
                    "images are paired with themselves (augmented pairs).",
                    stacklevel=2,
                )

    def __len__(self) -> int:
        if self.pairs is not None:
            return int(self.pairs.shape[0])
        return len(self.dataset)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch used by seeded positive draws (no effect with seed=None).

        Args:
            epoch: The current epoch.
        """
        self.epoch = epoch

    def _rng(self, index: int) -> np.random.Generator | None:
        if self.seed is None:
            return None
        return np.random.default_rng([self.seed, self.epoch, index])

    @staticmethod
    def _uniform(rng: np.random.Generator | None) -> float:
        if rng is None:
            return float(torch.rand(()).item())
        return float(rng.random())

    @staticmethod
    def _randint(high: int, rng: np.random.Generator | None) -> int:
        if rng is None:
            return int(torch.randint(high, ()).item())
        return int(rng.integers(high))

    def positive_index(self, index: int) -> tuple[int, int]:
        """Draws the pair indices ``(index_x, index_pos)`` of item ``index``.

        Args:
            index: Item index in ``[0, len(self))``.

        Returns:
            Indices of ``x`` and ``x+`` in the wrapped dataset.

        Raises:
            IndexError: If ``index`` is out of range.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} items.")
        rng = self._rng(index)
        if self.pairs is not None:
            anchor, positive = (int(v) for v in self.pairs[index])
        else:
            anchor = positive = index
            if self.neighbors is not None:
                row = self.neighbors.neighbors[index]
                positive = int(row[self._randint(len(row), rng)])
            elif self.labels is not None:
                members = self._class_members[self._class_of[index]]
                if len(members) > 1:
                    draw = self._randint(len(members) - 1, rng)
                    own = int(np.searchsorted(members, index))
                    positive = int(members[draw + (draw >= own)])
        if self.p_self > 0 and self._uniform(rng) < self.p_self:
            positive = anchor
        return anchor, positive

    def __getitem__(self, index: int) -> tuple[Any, Any, int, int]:
        """Returns ``(view, view_pos, index_x, index_pos)`` (see the class docs)."""
        anchor, positive = self.positive_index(index)
        image = item_image(self.dataset[anchor])
        image_pos = image if positive == anchor else item_image(self.dataset[positive])
        transform_pos = (
            self.transform_pos if self.transform_pos is not None else self.transform
        )
        view = self.transform(image) if self.transform is not None else image
        view_pos = transform_pos(image_pos) if transform_pos is not None else image_pos
        return view, view_pos, anchor, positive


class AugmentedPairDataset(SemanticPairDataset):
    """Baseline of the semantic-pairs study [0]: two augmented views of one image.

    Equivalent to ``SemanticPairDataset(dataset, mode="self", ...)``; with
    ``indices`` (e.g. the first column of a curated pair list) it iterates over those
    images, which matches the class composition and pair count of the semantic-pair
    set as in [0]. Returns ``(view, view_pos, index, index)``.

    - [0]: Alkhalefi et al., The Impact of Semantic Pairs on Self-Supervised
      Representation Learning, 2025, https://arxiv.org/abs/2510.08722
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        indices: np.ndarray | Tensor | Sequence[int] | None = None,
        transform: Callable[[Any], Any] | None = None,
        transform_pos: Callable[[Any], Any] | None = None,
    ) -> None:
        """Initializes the baseline pair dataset.

        Args:
            dataset: Map-style dataset of images.
            indices: Images to iterate over (with repetition allowed); all images
                if None.
            transform: Transform of the first view.
            transform_pos: Transform of the second view; ``transform`` if None.

        Raises:
            ValueError: If an index is out of range.
        """
        super().__init__(
            dataset,
            mode="self",
            transform=transform,
            transform_pos=transform_pos,
        )
        if indices is not None:
            anchors = to_numpy(indices).astype(np.int64).reshape(-1)
            self.pairs = _validate_pairs(
                np.stack([anchors, anchors], axis=1),
                len(dataset),  # type: ignore[arg-type]
            )


def _validate_pairs(
    pairs: np.ndarray | Tensor | Sequence[Sequence[int]], num_samples: int
) -> np.ndarray:
    array = to_numpy(pairs)
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] == 0:
        raise ValueError(
            f"pairs must have shape (M, 2) with M >= 1 but has shape {array.shape}."
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"pairs must hold integer indices but has dtype {array.dtype}."
        )
    if array.min() < 0 or array.max() >= num_samples:
        raise ValueError(
            f"pairs must hold indices in [0, {num_samples}) but holds values in "
            f"[{array.min()}, {array.max()}]."
        )
    return array.astype(np.int64)
