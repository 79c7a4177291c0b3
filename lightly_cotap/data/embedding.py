"""Embeds every image of a dataset with a frozen backbone (for neighbour search)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lightly_cotap.data.dataset_items import item_image


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
        image = item_image(self.dataset[index])
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
        first = item_image(dataset[0])
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
