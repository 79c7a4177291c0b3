"""Cell pooling, foreground-cell selection and pair similarities of the CoTAP loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pool_cells(features: Tensor, pool_size: int) -> Tensor:
    """Average-pools every crop to ``pool_size x pool_size`` cells and concatenates
    the cells of the crops of an image.

    Args:
        features: Channel-last dense features or masks. Shape: (B, V, h, w, K).
        pool_size: Cell grid size ``p``.

    Returns:
        Cells in (crop, row, column) order: cell ``v * p * p + i * p + j`` is cell
        ``(i, j)`` of crop ``v``. Shape: (B, V * p * p, K).
    """
    b, v, h, w, k = features.shape
    # adaptive_avg_pool2d takes (N, K, h, w); the permuted view keeps the
    # channel-last memory layout, which the pooling supports as it is.
    pooled = F.adaptive_avg_pool2d(
        features.reshape(b * v, h, w, k).permute(0, 3, 1, 2), pool_size
    )
    return pooled.permute(0, 2, 3, 1).reshape(b, v * pool_size * pool_size, k)


def select_foreground_cells(
    fg_mask: Tensor, *, pool_size: int, top_k: int, random_tie_break: bool = True
) -> Tensor:
    """Returns the indices of the ``top_k`` cells with the highest pooled
    foreground fraction.

    Args:
        fg_mask: Foreground mask, bool or float. Shape: (B, V, h, w).
        pool_size: Cell grid size ``p``.
        top_k: Number of cells to keep per image (clamped to ``V * p * p``).
        random_tie_break: Choose uniformly at random among cells with equal
            foreground fraction; otherwise the lower cell index wins.

    Returns:
        Cell indices into the ``V * p * p`` cells of :func:`pool_cells`, sorted by
        decreasing foreground fraction. Shape: (B, min(top_k, V * p * p)).
    """
    mask = fg_mask.to(torch.float32).unsqueeze(-1)  # (B, V, h, w, 1)
    score = pool_cells(mask, pool_size).squeeze(-1)  # (B, V*p*p)
    k = min(top_k, score.shape[1])
    if random_tie_break:
        order = torch.rand(score.shape, device=score.device).argsort(dim=1)
    else:
        order = torch.arange(score.shape[1], device=score.device).expand_as(score)
    shuffled = torch.gather(score, 1, order)
    rank = torch.sort(shuffled, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.gather(order, 1, rank)


def draw_negative_images(
    *,
    batch_size: int,
    num_negatives: int,
    device: torch.device | str | None = None,
    broadcast: bool = False,
) -> Tensor:
    """Draws ``num_negatives`` distinct other images for every image of a batch.

    A random cyclic order of the batch is drawn; image ``b`` takes the
    ``num_negatives`` images that follow it in that order. Every column is a
    derangement (no image is its own negative), the negatives of an image are
    distinct, and every image is used as a negative exactly ``num_negatives`` times.

    Args:
        batch_size: Number of images ``B``.
        num_negatives: ``R``, at most ``B - 1``.
        device: Device of the result.
        broadcast: Draw on rank 0 and broadcast to all ranks (distributed runs).

    Returns:
        Indices of the negative images. Shape: (B, R), int64.

    Raises:
        ValueError: If ``num_negatives`` is not in ``[0, batch_size - 1]``.
    """
    if not 0 <= num_negatives <= max(batch_size - 1, 0):
        raise ValueError(
            f"num_negatives must be in [0, batch_size - 1] = [0, {batch_size - 1}], "
            f"got num_negatives={num_negatives}."
        )
    order = torch.randperm(batch_size, device=device)
    if broadcast:
        # lightly.utils.dist has no broadcast.
        torch.distributed.broadcast(order, src=0)
    position = torch.empty_like(order)
    position[order] = torch.arange(batch_size, device=order.device)
    shifts = torch.arange(1, num_negatives + 1, device=order.device)
    return order[(position[:, None] + shifts[None, :]) % batch_size]


def pair_similarities(
    *, anchors: Tensor, positives: Tensor, negative_index: Tensor
) -> tuple[Tensor, Tensor]:
    """Returns the cosine similarities of the positive and negative pairs of a batch.

    Args:
        anchors: Selected cells of every ``x``. Shape: (B, k, K).
        positives: Selected cells of every ``x+``. Shape: (B, k', K).
        negative_index: Other images whose ``x+`` cells are negatives of image b.
            Shape: (B, R).

    Returns:
        ``(similarity, is_positive)``, both of shape (B, 1 + R, k, k'). Entry
        ``[b, 0, i, j]`` is ``cos(anchors[b, i], positives[b, j])`` (own pair),
        entry ``[b, 1 + r, i, j]`` is ``cos(anchors[b, i],
        positives[negative_index[b, r], j])``. Computed in float32 (float64 for
        float64 inputs), outside autocast.
    """
    dtype = torch.float64 if anchors.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        a = F.normalize(anchors.to(dtype), dim=-1)
        p = F.normalize(positives.to(dtype), dim=-1)
        index = torch.cat(
            [
                torch.arange(a.shape[0], device=a.device)[:, None],
                negative_index.to(a.device),
            ],
            dim=1,
        )  # (B, 1 + R)
        similarity = torch.einsum("bik,brjk->brij", a, p[index])
    is_positive = torch.zeros_like(similarity, dtype=torch.bool)
    is_positive[:, 0] = True
    return similarity, is_positive
