"""Alignment of the dense features of two crops of one image (RoI-align on boxes).

Image boxes are ``(x0, y0, x1, y1)`` in continuous pixel coordinates of the
original image, as returned by :class:`~lightly_cotap.transforms.CoTAPTransform`.
**Grid boxes** are ``(x0, y0, x1, y1)`` in the continuous coordinates of a crop's
dense feature grid of shape ``(H_f, W_f)`` (e.g. ``(14, 14)`` for a ViT-*/16 on a
224 px crop): the grid spans ``[0, W_f] x [0, H_f]`` and feature cell ``(r, c)``
covers ``[c, c + 1] x [r, r + 1]``. This is what
``lightly.loss.roi_resample_to_grid(feature_map, boxes, out_h, out_w)`` expects (it
calls ``roi_align(..., spatial_scale=1, aligned=True)``, which samples at cell
centres ``c + 0.5``). The feature grid is assumed to cover the whole crop (true for
a ViT whose patch size divides the crop size).
"""

from __future__ import annotations

import torch
from lightly.loss import roi_resample_to_grid
from torch import Tensor


def _as_grid_size(grid_size: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(grid_size, int):
        grid_size = (grid_size, grid_size)
    if len(grid_size) != 2 or min(grid_size) <= 0:
        raise ValueError(
            f"{name} must be a positive int or (H_f, W_f) but is {grid_size}."
        )
    return int(grid_size[0]), int(grid_size[1])


def image_boxes_to_grid(
    boxes: Tensor,
    crop_boxes: Tensor,
    grid_size: int | tuple[int, int],
    flipped: Tensor | None = None,
) -> Tensor:
    """Maps boxes from original-image pixels into a crop's feature-grid coordinates.

    A point ``x`` of the original image lies at ``(x - cx0) / (cx1 - cx0) * W_f`` on
    the feature grid of the crop ``(cx0, cy0, cx1, cy1)`` (``W_f - that`` if the crop
    was flipped horizontally; the box is then mirrored, so ``x0 <= x1`` still holds,
    but the grid read out of it runs from right to left in image coordinates, see
    :func:`resample_crop_features`).

    Args:
        boxes: Boxes ``(x0, y0, x1, y1)`` in original-image pixels.
            Shape ``(..., 4)``.
        crop_boxes: The crops' boxes in original-image pixels, broadcastable to
            ``boxes``. Shape ``(..., 4)``.
        grid_size: Feature grid size ``(H_f, W_f)`` of the crop, or an int for a
            square grid.
        flipped: Optional bool tensor telling whether each crop was flipped
            horizontally. Shape ``(...)``, broadcastable to ``boxes.shape[:-1]``.

    Returns:
        Boxes ``(x0, y0, x1, y1)`` in feature-grid coordinates, float. Shape
        ``(..., 4)``.

    Raises:
        ValueError: If the last dimension is not 4 or the grid size is invalid.
    """
    grid_h, grid_w = _as_grid_size(grid_size, "grid_size")
    if boxes.shape[-1] != 4 or crop_boxes.shape[-1] != 4:
        raise ValueError(
            f"boxes and crop_boxes must have shape (..., 4) but have shapes "
            f"{tuple(boxes.shape)} and {tuple(crop_boxes.shape)}."
        )
    boxes = boxes.float()
    crop_boxes = crop_boxes.float()
    crop_w = crop_boxes[..., 2] - crop_boxes[..., 0]
    crop_h = crop_boxes[..., 3] - crop_boxes[..., 1]
    gx0 = (boxes[..., 0] - crop_boxes[..., 0]) / crop_w * grid_w
    gx1 = (boxes[..., 2] - crop_boxes[..., 0]) / crop_w * grid_w
    gy0 = (boxes[..., 1] - crop_boxes[..., 1]) / crop_h * grid_h
    gy1 = (boxes[..., 3] - crop_boxes[..., 1]) / crop_h * grid_h
    if flipped is not None:
        flipped = flipped.to(device=boxes.device, dtype=torch.bool)
        gx0, gx1 = (
            torch.where(flipped, grid_w - gx1, gx0),
            torch.where(flipped, grid_w - gx0, gx1),
        )
    return torch.stack([gx0, gy0, gx1, gy1], dim=-1)


def box_intersection(boxes_a: Tensor, boxes_b: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection of two sets of boxes ``(x0, y0, x1, y1)``.

    Args:
        boxes_a: Boxes. Shape ``(..., 4)``.
        boxes_b: Boxes, broadcastable to ``boxes_a``. Shape ``(..., 4)``.

    Returns:
        Tuple ``(intersection, valid)``: the intersection boxes, shape ``(..., 4)``,
        degenerate (zero width or height) where the boxes do not overlap, and a
        bool tensor that is True where the intersection has a positive area,
        shape ``(...)``.
    """
    top_left = torch.maximum(boxes_a[..., :2], boxes_b[..., :2])
    bottom_right = torch.minimum(boxes_a[..., 2:], boxes_b[..., 2:])
    valid = (bottom_right > top_left).all(dim=-1)
    bottom_right = torch.maximum(bottom_right, top_left)
    return torch.cat([top_left, bottom_right], dim=-1), valid


def crop_pair_grid_boxes(
    boxes: Tensor,
    i: int,
    j: int,
    grid_size_i: int | tuple[int, int],
    grid_size_j: int | tuple[int, int],
    flipped: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Intersection of crops ``i`` and ``j`` in each crop's feature-grid coordinates.

    Resampling the feature map of crop ``i`` over the first returned box and that
    of crop ``j`` over the second one (same output size) yields features of the
    same image locations, cell for cell (use :func:`resample_crop_features` if
    crops can be flipped; with ``hf_prob=0`` ``lightly.loss.roi_resample_to_grid``
    can be used directly).

    Args:
        boxes: Crop boxes as returned by :class:`CoTAPTransform` (original-image
            pixels, ``(x0, y0, x1, y1)``). Shape ``(B, V, 4)`` or ``(V, 4)``.
        i: Index of the first crop in ``[0, V)``.
        j: Index of the second crop in ``[0, V)``.
        grid_size_i: Feature grid size ``(H_f, W_f)`` (or int) of crop ``i``, e.g.
            ``global_crop_size // patch_size``.
        grid_size_j: Feature grid size ``(H_f, W_f)`` (or int) of crop ``j``.
        flipped: Optional flip flags from :class:`CoTAPTransform`. Shape
            ``(B, V)`` or ``(V,)``.

    Returns:
        Tuple ``(boxes_i, boxes_j, valid)``: grid boxes ``(x0, y0, x1, y1)`` for
        crop ``i`` and crop ``j``, shape ``(B, 4)`` (or ``(4,)``), and a bool
        tensor, shape ``(B,)`` (or ``()``), that is False where the crops do not
        overlap (their boxes are then degenerate and must be masked out). Global
        and local crops of :class:`CoTAPTransform` always overlap the global crops.

    Raises:
        ValueError: If ``boxes`` has the wrong shape, ``i``/``j`` is out of range or
            a grid size is not positive.
    """
    if boxes.dim() not in (2, 3) or boxes.shape[-1] != 4:
        raise ValueError(
            f"boxes must have shape (B, V, 4) or (V, 4) but has shape "
            f"{tuple(boxes.shape)}."
        )
    grid_size_i = _as_grid_size(grid_size_i, "grid_size_i")
    grid_size_j = _as_grid_size(grid_size_j, "grid_size_j")
    n_views = boxes.shape[-2]
    for name, index in (("i", i), ("j", j)):
        if not 0 <= index < n_views:
            raise ValueError(f"{name}={index} is out of range for {n_views} crops.")
    box_i = boxes[..., i, :]
    box_j = boxes[..., j, :]
    inter, valid = box_intersection(box_i, box_j)
    flip_i = None if flipped is None else flipped[..., i]
    flip_j = None if flipped is None else flipped[..., j]
    grid_i = image_boxes_to_grid(inter, box_i, grid_size_i, flip_i)
    grid_j = image_boxes_to_grid(inter, box_j, grid_size_j, flip_j)
    return grid_i, grid_j, valid


def resample_crop_features(
    feature_map: Tensor,
    grid_boxes: Tensor,
    out_h: int,
    out_w: int,
    flipped: Tensor | None = None,
) -> Tensor:
    """RoI-aligns crop features onto a grid in original-image orientation.

    Calls ``lightly.loss.roi_resample_to_grid`` and, for crops that were flipped
    horizontally, reverses the output columns, so that output cell ``(r, c)`` of
    any two crops resampled over the same image region describes the same
    location. Without flips this equals ``roi_resample_to_grid``.

    Args:
        feature_map: Channel-last dense features of one crop per sample.
            Shape ``(B, H, W, C)``.
        grid_boxes: Boxes ``(x0, y0, x1, y1)`` in feature-grid coordinates, e.g.
            from :func:`crop_pair_grid_boxes`. Shape ``(B, 4)``.
        out_h: Output grid height.
        out_w: Output grid width.
        flipped: Optional bool flip flags of the crops. Shape ``(B,)``.

    Returns:
        Resampled features in row-major order. Shape ``(B, out_h * out_w, C)``.
    """
    # roi_resample_to_grid (torchvision's roi_align) takes channel-first maps.
    out: Tensor = roi_resample_to_grid(
        feature_map.permute(0, 3, 1, 2), grid_boxes, out_h, out_w
    )
    if flipped is None:
        return out
    if flipped.shape != (feature_map.shape[0],):
        raise ValueError(
            f"flipped must have shape ({feature_map.shape[0]},) but has shape "
            f"{tuple(flipped.shape)}."
        )
    batch, _, channels = out.shape
    grid = out.reshape(batch, out_h, out_w, channels)
    mirrored = grid.flip(dims=(2,))
    grid = torch.where(flipped.to(out.device).view(-1, 1, 1, 1), mirrored, grid)
    return grid.reshape(batch, out_h * out_w, channels)
