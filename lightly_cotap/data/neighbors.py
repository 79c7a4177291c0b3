"""Exact cosine k-nearest neighbours of a dataset's images, stored and reused.

:class:`NeighborIndex` embeds a dataset with any backbone
(:func:`~lightly_cotap.data.embedding.embed_dataset`), stores every image's exact
cosine top-k neighbours (self excluded) and saves them as ``.npz``, keyed by what
they depend on so a cache is reused only for the same inputs. CoTAP [0] draws the
positive image x+ of x uniformly from x's 7 nearest neighbours.

Over 400 lines because the index's one job (build, check, save, load, cache) is
documented argument by argument; the search itself is :func:`cosine_topk_neighbors`.

- [0]: CoTAP, 2025, https://arxiv.org/abs/2509.09429
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from lightly_cotap.atomic_write import atomic_path
from lightly_cotap.data.dataset_items import to_numpy
from lightly_cotap.data.embedding import embed_dataset

_NPZ_FORMAT_VERSION = 1


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
        array = to_numpy(neighbors)
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
            sims = to_numpy(similarities).astype(np.float32)
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
