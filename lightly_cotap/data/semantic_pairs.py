"""Semantic positive pairs: nearest-neighbour images (CoTAP) and curated / same-class pairs.

- :class:`NeighborIndex` embeds a dataset with any backbone and stores every image's
  exact cosine top-k neighbours (self excluded); it is saved as ``.npz`` and reused
  across runs. CoTAP [0] draws the positive image x+ of x uniformly from x's 7
  nearest neighbours.
- :class:`SemanticPairDataset` wraps any map-style dataset (torchvision datasets,
  ``lightly.data.LightlyDataset``, :class:`~lightly_cotap.data.SampleImageDataset`,
  ...) and yields ``(view, view_pos, index, index_pos)``, where the positive comes
  from the neighbours, from a curated list of index pairs, or from the same class
  (semantic pairs [1]), optionally falling back to an augmented pair of x itself.
- :class:`AugmentedPairDataset` is the matched baseline (two views of one image).

- [0]: CoTAP, 2025, https://arxiv.org/abs/2509.09429
- [1]: Alkhalefi et al., The Impact of Semantic Pairs on Self-Supervised
  Representation Learning, 2025, https://arxiv.org/abs/2510.08722
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lightly_cotap.atomic_write import atomic_path

PairMode = Literal["neighbors", "pairs", "labels", "self"]
"""How :class:`SemanticPairDataset` picks the positive of an image."""

_NPZ_FORMAT_VERSION = 1


def _item_image(item: Any) -> Any:
    """Returns the image of a dataset item.

    ``(image, target)`` (torchvision), ``(image, target, filename)`` (LightlyDataset)
    and bare images are supported.
    """
    if isinstance(item, (tuple, list)):
        if len(item) == 0:
            raise ValueError("dataset returned an empty tuple; expected an image.")
        return item[0]
    return item


def default_embedding_transform(input_size: int = 224) -> Callable[[Any], Tensor]:
    """Deterministic evaluation transform used to embed images for the neighbours.

    Resize of the shorter side to ``input_size * 256 / 224``, center crop of
    ``input_size``, to-tensor and ImageNet normalisation.

    Args:
        input_size: Side of the square model input in pixels.

    Returns:
        A callable mapping a PIL image (or tensor) to a tensor of shape
        ``(3, input_size, input_size)``.
    """
    transform: Callable[[Any], Tensor] = T.Compose(
        [
            T.Resize(int(round(input_size * 256 / 224))),
            T.CenterCrop(input_size),
            T.ToTensor(),
            T.Normalize(mean=IMAGENET_NORMALIZE["mean"], std=IMAGENET_NORMALIZE["std"]),
        ]
    )
    return transform


def _identity(image: Tensor) -> Tensor:
    return image


class _TransformedImages(Dataset[Tensor]):
    """Dataset view that returns only the transformed image of each item."""

    def __init__(
        self, dataset: Dataset[Any], transform: Callable[[Any], Tensor]
    ) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Tensor:
        image = _item_image(self.dataset[index])
        return self.transform(image)


def _output_to_embeddings(output: Any) -> Tensor:
    """Extracts a ``(B, D)`` embedding from a backbone output."""
    if isinstance(output, Tensor):
        embeddings = output
    elif isinstance(getattr(output, "cls", None), Tensor):
        embeddings = output.cls
    elif isinstance(output, Mapping) and isinstance(output.get("cls"), Tensor):
        embeddings = output["cls"]
    else:
        raise ValueError(
            "backbone output must be a (B, D) tensor or have a tensor attribute/key "
            f"'cls', but is {type(output).__name__}; pass embed_fn to extract the "
            "image embedding."
        )
    if embeddings.dim() != 2:
        raise ValueError(
            "the image embedding must have shape (B, D) but has shape "
            f"{tuple(embeddings.shape)}; pass embed_fn (e.g. pooling the tokens)."
        )
    return embeddings


@torch.no_grad()
def embed_dataset(
    dataset: Dataset[Any],
    backbone: Callable[[Tensor], Any] | None = None,
    *,
    embed_fn: Callable[[Tensor], Tensor] | None = None,
    transform: Callable[[Any], Tensor] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> Tensor:
    """Embeds every image of a dataset and L2-normalises the embeddings.

    Args:
        dataset: Map-style dataset returning ``(image, target, ...)`` tuples or
            images. The images are passed through ``transform``.
        backbone: Callable (usually an ``nn.Module``) mapping a batch of images
            ``(B, 3, H, W)`` to embeddings ``(B, D)``, or to an object / mapping with
            a ``cls`` tensor ``(B, D)`` (e.g. ``CoTAPVisionTransformer``). Modules are
            put in eval mode for the embedding and restored afterwards.
        embed_fn: Alternative to ``backbone``: any callable ``images -> (B, D)``.
        transform: Maps a dataset image to a tensor ``(3, H, W)``. Defaults to
            :func:`default_embedding_transform` (224 px) for non-tensor images and
            to no transform for tensor images.
        batch_size: Images per forward pass.
        device: Device of the forward passes; the images are moved there, the
            backbone is expected to be there already.
        num_workers: DataLoader workers for loading and transforming images.
        progress: Whether to show a tqdm progress bar.

    Returns:
        L2-normalised float32 embeddings on the CPU. Shape ``(N, D)``.

    Raises:
        ValueError: If neither or both of ``backbone`` and ``embed_fn`` are given,
            the dataset is empty, or the output has the wrong shape or non-finite
            values.
    """
    if (backbone is None) == (embed_fn is None):
        raise ValueError("pass exactly one of backbone and embed_fn.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive but is {batch_size}.")
    num_samples = len(dataset)  # type: ignore[arg-type]
    if num_samples == 0:
        raise ValueError("dataset is empty.")
    if transform is None:
        first = _item_image(dataset[0])
        transform = (
            _identity if isinstance(first, Tensor) else default_embedding_transform()
        )
    loader = DataLoader(
        _TransformedImages(dataset, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    module = backbone if isinstance(backbone, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    chunks: list[Tensor] = []
    try:
        for images in tqdm(
            loader, desc="Embedding images", unit="batch", disable=not progress
        ):
            images = images.to(device)
            if embed_fn is not None:
                output: Any = embed_fn(images)
            else:
                assert backbone is not None
                output = backbone(images)
            embeddings = _output_to_embeddings(output)
            if embeddings.shape[0] != images.shape[0]:
                raise ValueError(
                    f"backbone returned {embeddings.shape[0]} embeddings for a batch "
                    f"of {images.shape[0]} images."
                )
            chunks.append(embeddings.detach().float().cpu())
    finally:
        if module is not None:
            module.train(was_training)
    all_embeddings = torch.cat(chunks)
    if not torch.isfinite(all_embeddings).all():
        raise ValueError("the backbone produced non-finite embeddings.")
    return F.normalize(all_embeddings, dim=1)


@torch.no_grad()
def cosine_topk_neighbors(
    embeddings: Tensor,
    k: int,
    *,
    chunk_size: int = 4096,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Exact cosine top-k neighbours of every row, excluding the row itself.

    The similarity matrix is computed in ``chunk_size x chunk_size`` blocks with a
    running top-k, so memory stays ``O(chunk_size * (chunk_size + k))`` instead of
    ``O(N^2)``. Only the row's own index is excluded: other rows with identical
    embeddings (duplicate images) are valid neighbours. Ties at the k-th place are
    broken arbitrarily.

    Args:
        embeddings: Embeddings (normalised internally). Shape ``(N, D)``.
        k: Number of neighbours, ``1 <= k <= N - 1``.
        chunk_size: Rows and columns per block.
        progress: Whether to show a tqdm progress bar over the row blocks.

    Returns:
        Tuple ``(indices, similarities)``: neighbour indices (int64) and cosine
        similarities (float32), sorted by decreasing similarity, on the device of
        ``embeddings``. Shapes ``(N, k)``.

    Raises:
        ValueError: If ``embeddings`` is not 2-D or not finite, or ``k`` or
            ``chunk_size`` is out of range.
    """
    if embeddings.dim() != 2:
        raise ValueError(
            f"embeddings must have shape (N, D) but has shape "
            f"{tuple(embeddings.shape)}."
        )
    num_samples = embeddings.shape[0]
    if not 1 <= k <= num_samples - 1:
        raise ValueError(
            f"k must be in [1, N - 1] = [1, {num_samples - 1}] for N={num_samples} "
            f"samples but is {k}."
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive but is {chunk_size}.")
    if not torch.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or infinite values.")
    x = F.normalize(embeddings.float(), dim=1)
    device = x.device
    all_indices = torch.empty(num_samples, k, dtype=torch.long, device=device)
    all_sims = torch.empty(num_samples, k, dtype=torch.float32, device=device)
    for r0 in tqdm(
        range(0, num_samples, chunk_size),
        desc="Nearest neighbours",
        unit="chunk",
        disable=not progress,
    ):
        r1 = min(r0 + chunk_size, num_samples)
        rows = x[r0:r1]
        row_ids = torch.arange(r0, r1, device=device)
        best_sims = torch.empty(r1 - r0, 0, device=device)
        best_ids = torch.empty(r1 - r0, 0, dtype=torch.long, device=device)
        for c0 in range(0, num_samples, chunk_size):
            c1 = min(c0 + chunk_size, num_samples)
            sims = rows @ x[c0:c1].T  # (R, C)
            if c0 < r1 and r0 < c1:  # the block contains diagonal entries
                col_ids = torch.arange(c0, c1, device=device)
                sims.masked_fill_(row_ids[:, None] == col_ids[None, :], -torch.inf)
            block_sims, block_ids = sims.topk(min(k, c1 - c0), dim=1)
            best_sims = torch.cat([best_sims, block_sims], dim=1)
            best_ids = torch.cat([best_ids, block_ids + c0], dim=1)
            if best_sims.shape[1] > k:
                best_sims, order = best_sims.topk(k, dim=1)
                best_ids = best_ids.gather(1, order)
        best_sims, order = best_sims.sort(dim=1, descending=True)
        best_ids = best_ids.gather(1, order)
        all_indices[r0:r1] = best_ids
        all_sims[r0:r1] = best_sims
    return all_indices, all_sims


class NeighborIndex:
    """Exact cosine k-nearest-neighbour index of a dataset, for CoTAP positives [0].

    ``neighbors[i]`` holds the indices of the ``k`` images most similar to image
    ``i`` (cosine similarity of L2-normalised embeddings, most similar first);
    ``i`` itself is never among them (other images with identical content may
    be). CoTAP uses k = 7 neighbours from a ViT-B feature extractor [0].

    - [0]: CoTAP, 2025, https://arxiv.org/abs/2509.09429

    Attributes:
        neighbors: Neighbour indices, int64. Shape ``(N, k)``.
        similarities: Cosine similarities of the neighbours, float32, or None when
            unknown (e.g. loaded from a file without them). Shape ``(N, k)``.

    Examples:
        >>> import timm
        >>> from lightly_cotap.data import NeighborIndex, SampleImageDataset
        >>> dataset = SampleImageDataset()
        >>> backbone = timm.create_model("vit_small_patch16_224", num_classes=0)
        >>> index = NeighborIndex.load_or_build(
        ...     "nns.npz", dataset, backbone, k=3, batch_size=8
        ... )
        >>> index.neighbors.shape
        (8, 3)
    """

    def __init__(
        self,
        neighbors: np.ndarray | Tensor | Sequence[Sequence[int]],
        similarities: np.ndarray | Tensor | None = None,
    ) -> None:
        """Initializes the index from a neighbour array.

        Args:
            neighbors: Neighbour indices, integers in ``[0, N)``, no row ``i``
                containing ``i``. Shape ``(N, k)``.
            similarities: Optional similarities of the neighbours. Shape ``(N, k)``.

        Raises:
            ValueError: If the array has the wrong shape or dtype, an index is out of
                range, or a row contains its own index.
        """
        array = _to_numpy(neighbors)
        if array.ndim != 2 or array.shape[1] < 1:
            raise ValueError(
                f"neighbors must have shape (N, k) with k >= 1 but has shape "
                f"{array.shape}."
            )
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(
                f"neighbors must hold integer indices but has dtype {array.dtype}."
            )
        num_samples, k = array.shape
        array = array.astype(np.int64)
        if array.size and (array.min() < 0 or array.max() >= num_samples):
            raise ValueError(
                f"neighbors must hold indices in [0, {num_samples}) but holds values "
                f"in [{array.min()}, {array.max()}]."
            )
        self_rows = np.nonzero((array == np.arange(num_samples)[:, None]).any(axis=1))[
            0
        ]
        if self_rows.size:
            raise ValueError(
                f"neighbors of rows {self_rows[:5].tolist()} contain the row's own "
                "index; self must be excluded (NeighborIndex.load strips the self "
                "column of files in the STEGO/CoTAP 'nns' format)."
            )
        self.neighbors: np.ndarray = array
        self.similarities: np.ndarray | None = None
        if similarities is not None:
            sims = _to_numpy(similarities).astype(np.float32)
            if sims.shape != array.shape:
                raise ValueError(
                    f"similarities must have the shape of neighbors {array.shape} but "
                    f"has shape {sims.shape}."
                )
            self.similarities = sims

    def __len__(self) -> int:
        return int(self.neighbors.shape[0])

    @property
    def k(self) -> int:
        """Number of neighbours per image."""
        return int(self.neighbors.shape[1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_samples={len(self)}, k={self.k})"

    def check_length(self, num_samples: int) -> None:
        """Raises a ValueError if the index was built for a dataset of another size.

        Args:
            num_samples: Length of the dataset the index is used with.
        """
        if len(self) != num_samples:
            raise ValueError(
                f"the neighbour index has {len(self)} rows but the dataset has "
                f"{num_samples} images; it was built for a different dataset. "
                "Rebuild it (NeighborIndex.build) or delete the cached file."
            )

    @classmethod
    def from_embeddings(
        cls,
        embeddings: Tensor,
        k: int = 7,
        *,
        chunk_size: int = 4096,
        progress: bool = False,
    ) -> NeighborIndex:
        """Builds the index from precomputed embeddings.

        Args:
            embeddings: Image embeddings (normalised internally). Shape ``(N, D)``.
            k: Number of neighbours per image.
            chunk_size: Block size of the chunked similarity computation.
            progress: Whether to show a progress bar.

        Returns:
            The index.
        """
        indices, sims = cosine_topk_neighbors(
            embeddings, k, chunk_size=chunk_size, progress=progress
        )
        return cls(indices.cpu().numpy(), sims.cpu().numpy())

    @classmethod
    def build(
        cls,
        dataset: Dataset[Any],
        backbone: Callable[[Tensor], Any] | None = None,
        *,
        k: int = 7,
        embed_fn: Callable[[Tensor], Tensor] | None = None,
        transform: Callable[[Any], Tensor] | None = None,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        num_workers: int = 0,
        chunk_size: int = 4096,
        progress: bool = True,
    ) -> NeighborIndex:
        """Embeds a dataset and computes every image's exact cosine top-k neighbours.

        Args:
            dataset: Map-style dataset returning ``(image, target, ...)`` or images.
                Give it no random augmentation (``transform`` below is applied).
            backbone: Model mapping images ``(B, 3, H, W)`` to ``(B, D)`` or to an
                output with a ``cls`` tensor ``(B, D)``. See :func:`embed_dataset`.
            k: Number of neighbours per image (CoTAP: 7).
            embed_fn: Alternative to ``backbone``: callable ``images -> (B, D)``.
            transform: Image-to-tensor transform for the embedding; defaults to
                :func:`default_embedding_transform` for PIL images.
            batch_size: Images per forward pass.
            device: Device of the forward passes and of the neighbour search.
            num_workers: DataLoader workers.
            chunk_size: Block size of the chunked similarity computation.
            progress: Whether to show progress bars.

        Returns:
            The index.
        """
        embeddings = embed_dataset(
            dataset,
            backbone,
            embed_fn=embed_fn,
            transform=transform,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            progress=progress,
        )
        return cls.from_embeddings(
            embeddings.to(device), k, chunk_size=chunk_size, progress=progress
        )

    def save(
        self, path: str | os.PathLike[str], *, cache_key: str | None = None
    ) -> Path:
        """Saves the index as ``.npz`` (neighbours, similarities, k, dataset length).

        The file is written atomically (several processes may write it at once).

        Args:
            path: Output file; ``.npz`` is appended if missing.
            cache_key: Optional identity of what the index was built from (see
                :meth:`load_or_build`), stored in the file.

        Returns:
            The path written.
        """
        out = _npz_path(path)
        arrays: dict[str, np.ndarray] = {
            "neighbors": self.neighbors,
            "k": np.asarray(self.k),
            "num_samples": np.asarray(len(self)),
            "format_version": np.asarray(_NPZ_FORMAT_VERSION),
        }
        if self.similarities is not None:
            arrays["similarities"] = self.similarities
        if cache_key is not None:
            arrays["cache_key"] = np.asarray(cache_key)
        with atomic_path(out) as tmp:
            np.savez(tmp, **arrays)  # type: ignore[arg-type]
        return out

    @staticmethod
    def stored_cache_key(path: str | os.PathLike[str]) -> str | None:
        """The ``cache_key`` stored by :meth:`save`, or None (none stored / no file).

        Args:
            path: The ``.npz`` file.

        Returns:
            The stored key.
        """
        file = _npz_path(path)
        if not file.is_file():
            return None
        try:
            with np.load(file) as data:
                return str(data["cache_key"]) if "cache_key" in data else None
        except (OSError, ValueError):  # unreadable: treated as no cache
            return None

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        expected_length: int | None = None,
        k: int | None = None,
    ) -> NeighborIndex:
        """Loads an index saved by :meth:`save` or an official CoTAP/STEGO file.

        Files with a ``nns`` array (the format of the official CoTAP / STEGO
        ``nns_*.npz`` files) are accepted too. Their top-k lists include the image
        itself; it is removed from every row that contains it (and every row is cut
        to the same length), so CoTAP's "7 neighbours" correspond to ``k=6`` here
        plus ``p_self=1/7`` in :class:`SemanticPairDataset`.

        Args:
            path: The ``.npz`` file.
            expected_length: If given, the length of the dataset the index will be
                used with; a mismatch raises a ValueError.
            k: If given, keep only the first ``k`` neighbours of each image.

        Returns:
            The index.

        Raises:
            ValueError: If the file is malformed, its stored length does not match
                its array, or ``expected_length`` / ``k`` do not fit.
        """
        with np.load(Path(path)) as data:
            if "neighbors" in data:
                neighbors = data["neighbors"]
                sims = data["similarities"] if "similarities" in data else None
                if "num_samples" in data and int(data["num_samples"]) != len(neighbors):
                    raise ValueError(
                        f"{path} is corrupt: it records {int(data['num_samples'])} "
                        f"samples but holds {len(neighbors)} neighbour rows."
                    )
            elif "nns" in data:
                neighbors, sims = _strip_self(np.asarray(data["nns"])), None
            else:
                raise ValueError(
                    f"{path} has neither a 'neighbors' nor an 'nns' array "
                    f"(keys: {sorted(data.keys())})."
                )
        if k is not None:
            if not 1 <= k <= neighbors.shape[1]:
                raise ValueError(
                    f"k must be in [1, {neighbors.shape[1]}] for {path} but is {k}."
                )
            neighbors = neighbors[:, :k]
            sims = None if sims is None else sims[:, :k]
        index = cls(neighbors, sims)
        if expected_length is not None:
            index.check_length(expected_length)
        return index

    @classmethod
    def load_or_build(
        cls,
        path: str | os.PathLike[str],
        dataset: Dataset[Any],
        backbone: Callable[[Tensor], Any] | None = None,
        *,
        k: int = 7,
        cache_key: str | None = None,
        **build_kwargs: Any,
    ) -> NeighborIndex:
        """Loads the index from ``path`` if it exists, else builds and saves it.

        With a ``cache_key`` (an identity of everything the index depends on: the
        image files and their contents, the embedding weights, ``k``), a file is
        reused only if it stores the same key; otherwise it is rebuilt and replaced.
        Without one, a cached file is checked against ``len(dataset)`` and ``k``
        (ValueError on mismatch, so a stale cache is never silently reused).

        Args:
            path: Cache file (``.npz``).
            dataset: The dataset (see :meth:`build`).
            backbone: The backbone (see :meth:`build`).
            k: Number of neighbours per image.
            cache_key: Identity of the inputs, stored with the index.
            **build_kwargs: Further arguments of :meth:`build`.

        Returns:
            The index.
        """
        file = _npz_path(path)
        num_samples = len(dataset)  # type: ignore[arg-type]
        if file.exists() and cache_key is not None:
            if cls.stored_cache_key(file) == cache_key:
                return cls.load(file, expected_length=num_samples)
        elif file.exists():
            index = cls.load(file, expected_length=num_samples)
            if index.k != k:
                raise ValueError(
                    f"the cached index {file} has k={index.k} but k={k} was "
                    "requested; delete the file to rebuild it."
                )
            return index
        index = cls.build(dataset, backbone, k=k, **build_kwargs)
        index.save(file, cache_key=cache_key)
        return index


def _npz_path(path: str | os.PathLike[str]) -> Path:
    file = Path(path)
    return file if file.suffix == ".npz" else file.with_name(file.name + ".npz")


def _to_numpy(array: np.ndarray | Tensor | Sequence[Any]) -> np.ndarray:
    if isinstance(array, Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _strip_self(nns: np.ndarray) -> np.ndarray:
    """Removes each row's own index from a top-k list that may include it."""
    if nns.ndim != 2 or nns.shape[1] < 2:
        raise ValueError(f"'nns' must have shape (N, k + 1) but has shape {nns.shape}.")
    is_self = nns == np.arange(len(nns))[:, None]
    if not is_self.any():
        return nns
    if (is_self.sum(axis=1) > 1).any():
        raise ValueError("'nns' lists an image more than once as its own neighbour.")
    keep = ~is_self
    width = nns.shape[1] - 1
    # Stable order: the first `width` non-self entries of every row.
    order = np.argsort(~keep, axis=1, kind="stable")[:, :width]
    return np.take_along_axis(nns, order, axis=1)


def _dataset_targets(dataset: Any) -> np.ndarray:
    """Finds the class labels of a dataset without loading its images."""
    candidates = [dataset, getattr(dataset, "dataset", None)]
    for candidate in candidates:
        if candidate is None:
            continue
        targets = getattr(candidate, "targets", None)
        if targets is None:
            continue
        targets = _to_numpy(targets)
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
                _to_numpy(labels) if labels is not None else _dataset_targets(dataset)
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
        image = _item_image(self.dataset[anchor])
        image_pos = image if positive == anchor else _item_image(self.dataset[positive])
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
            anchors = _to_numpy(indices).astype(np.int64).reshape(-1)
            self.pairs = _validate_pairs(
                np.stack([anchors, anchors], axis=1),
                len(dataset),  # type: ignore[arg-type]
            )


def _validate_pairs(
    pairs: np.ndarray | Tensor | Sequence[Sequence[int]], num_samples: int
) -> np.ndarray:
    array = _to_numpy(pairs)
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
