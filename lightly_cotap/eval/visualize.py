"""Pictures of dense features: PCA-to-RGB maps and patch-similarity maps.

:func:`pca_rgb` projects dense features onto their first three principal components
(fitted jointly over all patches of the batch, so colours are comparable across the
images) and maps them to RGB, as in DINO / DINOv2 feature visualisations.
:func:`similarity_maps` shows the cosine similarity of every patch to one selected
patch. :func:`save_image_grid` writes rows of images as one PNG
(``torchvision.utils.make_grid``, saved atomically), and
:func:`save_dense_visualizations` combines them: each image next to its PCA map and
next to its similarity map. Dense features are channel-last, ``(B, h, w, D)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.transforms import functional as TF
from torchvision.utils import make_grid

from lightly_cotap.atomic_write import save_image
from lightly_cotap.eval.pca import principal_components

# Viridis anchor colours (matplotlib's colormap sampled at 0, 1/8, ..., 1).
_VIRIDIS = torch.tensor(
    [
        [68, 1, 84],
        [71, 44, 122],
        [59, 81, 139],
        [44, 113, 142],
        [33, 144, 141],
        [39, 173, 129],
        [92, 200, 99],
        [170, 220, 50],
        [253, 231, 37],
    ],
    dtype=torch.float32,
)


def _check_features(features: Tensor) -> None:
    if features.ndim != 4:
        raise ValueError(
            f"features must have shape (B, h, w, D), got {tuple(features.shape)}."
        )


def pca_rgb(
    features: Tensor,
    *,
    size: tuple[int, int] | None = None,
    quantile: float = 0.01,
) -> Tensor:
    """Maps dense features to RGB with their first three principal components.

    The PCA (:func:`~lightly_cotap.eval.pca.principal_components`) is fitted jointly
    on all B * h * w patch vectors; the sign of every component is fixed (largest
    absolute loading positive) so the colours are deterministic. Each component is
    clipped to its ``[quantile, 1 - quantile]`` range and scaled to [0, 255].

    Args:
        features: Dense features, channel-last. Shape: (B, h, w, D).
        size: Output size (H, W); components are upsampled bilinearly. ``None``
            keeps (h, w).
        quantile: Clipping quantile of every component.

    Returns:
        RGB images. Shape: (B, 3, H, W), uint8.

    Raises:
        ValueError: If ``features`` is not 4-D or ``quantile`` is not in [0, 0.5).
    """
    _check_features(features)
    if not 0.0 <= quantile < 0.5:
        raise ValueError(f"quantile must lie in [0, 0.5), got {quantile}.")
    b, h, w, c = features.shape
    x = features.detach().float().cpu().reshape(-1, c)
    x = x - x.mean(dim=0)
    proj = x @ principal_components(x, 3).float().T  # padded below if D < 3
    if proj.shape[1] < 3:
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], 3 - proj.shape[1])], 1)
    maps = proj.reshape(b, h, w, 3).permute(0, 3, 1, 2)
    if size is not None:
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    flat = maps.permute(1, 0, 2, 3).reshape(3, -1)
    lo = torch.quantile(flat, quantile, dim=1)[None, :, None, None]
    hi = torch.quantile(flat, 1.0 - quantile, dim=1)[None, :, None, None]
    scaled = ((maps - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    rgb: Tensor = (scaled * 255).round().to(torch.uint8)
    return rgb


def similarity_maps(features: Tensor, query: tuple[int, int, int]) -> Tensor:
    """Cosine similarity of every patch to one selected patch.

    Args:
        features: Dense features, channel-last. Shape: (B, h, w, D).
        query: ``(image index, row, column)`` of the selected patch.

    Returns:
        Similarities in [-1, 1]. Shape: (B, h, w).

    Raises:
        ValueError: If ``features`` is not 4-D or ``query`` is out of range.
    """
    _check_features(features)
    b, h, w, _ = features.shape
    i, y, x = query
    if not (0 <= i < b and 0 <= y < h and 0 <= x < w):
        raise ValueError(
            f"query must lie in [0, {b}) x [0, {h}) x [0, {w}), got {query}."
        )
    f = F.normalize(features.detach().float().cpu(), dim=-1)
    return torch.einsum("bhwc,c->bhw", f, f[i, y, x])


def colorize(values: Tensor, *, vmin: float = -1.0, vmax: float = 1.0) -> Tensor:
    """Maps scalar maps to RGB with the viridis colormap.

    Args:
        values: Scalar maps. Shape: (B, H, W).
        vmin: Value mapped to the first colour.
        vmax: Value mapped to the last colour.

    Returns:
        RGB images. Shape: (B, 3, H, W), uint8.
    """
    t = ((values.float() - vmin) / max(vmax - vmin, 1e-8)).clamp(0, 1)
    pos = t * (_VIRIDIS.shape[0] - 1)
    lo = pos.floor().long().clamp(max=_VIRIDIS.shape[0] - 2)
    frac = (pos - lo.float())[..., None]
    rgb = _VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac
    return rgb.round().to(torch.uint8).permute(0, 3, 1, 2)


def to_uint8_images(
    images: Tensor,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Tensor:
    """Undoes the input normalisation of a batch of images.

    Args:
        images: Images, normalised with ``mean`` / ``std`` or in [0, 1] when both are
            ``None``. Shape: (B, 3, H, W).
        mean: Per-channel mean used for normalisation.
        std: Per-channel standard deviation used for normalisation.

    Returns:
        RGB images. Shape: (B, 3, H, W), uint8.
    """
    x = images.detach().float().cpu()
    if mean is not None and std is not None:
        x = x * torch.tensor(std)[None, :, None, None]
        x = x + torch.tensor(mean)[None, :, None, None]
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _to_pil(image: Tensor | np.ndarray | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(
                f"image tensors must be (3, H, W), got {tuple(image.shape)}."
            )
        if image.is_floating_point():
            image = (image.clamp(0, 1) * 255).round()
        image = image.to(torch.uint8).expand(3, -1, -1).permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8)))


def save_image_grid(
    rows: Sequence[Sequence[Tensor | np.ndarray | Image.Image]],
    path: str | Path,
    *,
    cell_size: tuple[int, int] | None = None,
    padding: int = 2,
    pad_value: int = 255,
) -> Path:
    """Writes rows of images as one PNG grid (``torchvision.utils.make_grid``).

    Args:
        rows: Grid cells, row by row. A cell is a (3, H, W) tensor (uint8, or float in
            [0, 1]), an (H, W, 3) / (H, W) uint8 array or a PIL image. Shorter rows
            are filled with ``pad_value``.
        path: Output file (parent folders are created; written atomically).
        cell_size: ``(H, W)`` of every cell; cells are resized with nearest-neighbour
            interpolation (patch grids stay sharp). ``None``: size of the first cell.
        padding: Pixels between cells and around the grid.
        pad_value: Grey level (0-255) of the padding and of empty cells.

    Returns:
        The written path.

    Raises:
        ValueError: If ``rows`` is empty.
    """
    if len(rows) == 0 or all(len(r) == 0 for r in rows):
        raise ValueError("rows must contain at least one image.")
    cells = [[_to_pil(c) for c in row] for row in rows]
    if cell_size is None:
        first = next(c for row in cells for c in row)
        cell_size = (first.height, first.width)
    ch, cw = cell_size
    ncols = max(len(r) for r in cells)
    empty = torch.full((3, ch, cw), pad_value, dtype=torch.uint8)
    tensors = []
    for row in cells:
        for cell in row:
            if cell.size != (cw, ch):
                cell = cell.resize((cw, ch), Image.Resampling.NEAREST)
            tensors.append(TF.pil_to_tensor(cell))
        tensors += [empty] * (ncols - len(row))
    grid = make_grid(tensors, nrow=ncols, padding=padding, pad_value=pad_value)
    return save_image(TF.to_pil_image(grid), path)


def save_dense_visualizations(
    images: Tensor,
    features: Tensor,
    out_dir: str | Path,
    *,
    query: tuple[int, int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    prefix: str = "",
) -> dict[str, Path]:
    """Writes ``<prefix>pca.png`` and ``<prefix>similarity.png`` grids.

    Each row shows one image and, next to it, its PCA-to-RGB map (first file) or the
    similarity of its patches to the selected patch (second file; the selected patch
    is framed in red in its image).

    Args:
        images: Input images (normalised with ``mean`` / ``std``, or in [0, 1]).
            Shape: (B, 3, H, W).
        features: Dense features of the images, channel-last. Shape: (B, h, w, D).
        out_dir: Output folder.
        query: ``(image index, row, column)`` of the selected patch; defaults to the
            centre patch of the first image.
        mean: See :func:`to_uint8_images`.
        std: See :func:`to_uint8_images`.
        prefix: File name prefix.

    Returns:
        ``{"pca": path, "similarity": path}``.

    Raises:
        ValueError: If images and features disagree on the batch size.
    """
    _check_features(features)
    if images.ndim != 4 or images.shape[0] != features.shape[0]:
        raise ValueError(
            f"images must have shape (B={features.shape[0]}, 3, H, W), got "
            f"{tuple(images.shape)}."
        )
    _, h, w, _ = features.shape
    height, width = images.shape[-2:]
    if query is None:
        query = (0, h // 2, w // 2)
    rgb = to_uint8_images(images, mean=mean, std=std)
    pca = pca_rgb(features)
    sim = colorize(similarity_maps(features, query))
    out_dir = Path(out_dir)
    pca_path = save_image_grid(
        [[img, p] for img, p in zip(rgb, pca)],
        out_dir / f"{prefix}pca.png",
        cell_size=(height, width),
    )
    marked = [_to_pil(img) for img in rgb]
    i, y, x = query
    draw = ImageDraw.Draw(marked[i])
    sy, sx = height / h, width / w
    draw.rectangle(
        [x * sx, y * sy, (x + 1) * sx - 1, (y + 1) * sy - 1],
        outline=(255, 0, 0),
        width=2,
    )
    sim_path = save_image_grid(
        [[img, s] for img, s in zip(marked, sim)],
        out_dir / f"{prefix}similarity.png",
        cell_size=(height, width),
    )
    return {"pca": pca_path, "similarity": sim_path}
