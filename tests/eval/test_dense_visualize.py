from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightly_cotap.eval.visualize import (
    colorize,
    pca_rgb,
    save_dense_visualizations,
    save_image_grid,
    similarity_maps,
    to_uint8_images,
)


def _two_region_features() -> torch.Tensor:
    """Left half and right half differ along one direction, plus small noise."""
    g = torch.Generator().manual_seed(0)
    feats = 0.01 * torch.randn(2, 6, 8, 16, generator=g)
    direction = torch.randn(16, generator=g)
    feats[:, :, :4] += direction
    feats[:, :, 4:] -= direction
    return feats


def test_pca_rgb_separates_regions() -> None:
    rgb = pca_rgb(_two_region_features())
    assert rgb.shape == (2, 3, 6, 8) and rgb.dtype == torch.uint8
    first = rgb[:, 0].float()
    # The first component splits the halves: one side saturates low, the other high.
    assert abs(first[..., :4].mean() - first[..., 4:].mean()) > 200
    assert pca_rgb(_two_region_features(), size=(12, 16)).shape == (2, 3, 12, 16)
    # Deterministic sign: the components do not depend on the SVD's sign choice, so
    # negated features get the same component and inverted colours (a raw SVD of -x
    # returns negated singular vectors and would give identical colours).
    negated = pca_rgb(-_two_region_features())
    torch.testing.assert_close(
        negated[:, 0].int(), 255 - rgb[:, 0].int(), atol=1, rtol=0
    )


def test_pca_rgb_with_fewer_than_three_channels() -> None:
    rgb = pca_rgb(torch.randn(1, 3, 3, 2))
    assert rgb.shape == (1, 3, 3, 3)


def test_similarity_maps() -> None:
    feats = _two_region_features()
    sim = similarity_maps(feats, (1, 2, 1))
    assert sim.shape == (2, 6, 8)
    assert sim[1, 2, 1] == pytest.approx(1.0, abs=1e-5)
    assert (sim[..., :4] > 0.9).all() and (sim[..., 4:] < -0.9).all()
    with pytest.raises(ValueError, match="query"):
        similarity_maps(feats, (2, 0, 0))


def test_colorize_endpoints() -> None:
    rgb = colorize(torch.tensor([[[-1.0, 1.0, 5.0]]]))
    assert rgb.shape == (1, 3, 1, 3)
    assert rgb[0, :, 0, 0].tolist() == [68, 1, 84]
    assert rgb[0, :, 0, 1].tolist() == [253, 231, 37]
    assert rgb[0, :, 0, 2].tolist() == [253, 231, 37]  # clipped


def test_save_image_grid_size(tmp_path: Path) -> None:
    cells: list[list[torch.Tensor | np.ndarray | Image.Image]] = [
        [torch.zeros(3, 10, 12, dtype=torch.uint8), np.full((5, 6, 3), 255, np.uint8)],
        [torch.ones(3, 10, 12), Image.new("RGB", (7, 7))],
        [np.zeros((4, 4), np.uint8)],
    ]
    path = save_image_grid(cells, tmp_path / "sub" / "grid.png", padding=3)
    with Image.open(path) as grid:
        assert grid.size == (2 * 12 + 3 * 3, 3 * 10 + 4 * 3)
        arr = np.asarray(grid)
    # Second cell of the first row was resized to 10x12 and is white.
    assert (arr[3:13, 18:30] == 255).all()
    with pytest.raises(ValueError, match="at least one"):
        save_image_grid([], tmp_path / "x.png")


def test_save_image_grid_layout(tmp_path: Path) -> None:
    # Reference composed by hand: cells at padding + index * (size + padding), the
    # padding and the missing cell of the short row in the pad value.
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(0, 256, (3, 4, 5), generator=g).byte() for _ in range(3))
    path = save_image_grid([[a, b], [c]], tmp_path / "grid.png", padding=1, pad_value=7)
    expected = np.full((2 * 4 + 3, 2 * 5 + 3, 3), 7, np.uint8)
    for (row, col), cell in {(0, 0): a, (0, 1): b, (1, 0): c}.items():
        top, left = 1 + row * 5, 1 + col * 6
        expected[top : top + 4, left : left + 5] = cell.permute(1, 2, 0).numpy()
    with Image.open(path) as grid:
        np.testing.assert_array_equal(np.asarray(grid), expected)


def test_save_dense_visualizations(tmp_path: Path) -> None:
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    images = (torch.rand(3, 3, 48, 64) - 0.5) / 0.25
    feats = torch.randn(3, 3, 4, 8)
    paths = save_dense_visualizations(
        images, feats, tmp_path, mean=mean, std=std, query=(1, 0, 3), prefix="val_"
    )
    assert set(paths) == {"pca", "similarity"}
    for key, name in (("pca", "val_pca.png"), ("similarity", "val_similarity.png")):
        assert paths[key] == tmp_path / name and paths[key].is_file()
        with Image.open(paths[key]) as im:
            assert im.size == (2 * 64 + 3 * 2, 3 * 48 + 4 * 2)
    # The selected patch is framed in red in its image (row 1, patch column 3).
    with Image.open(paths["similarity"]) as im:
        arr = np.asarray(im)
    top = 2 + 1 * (48 + 2)
    assert arr[top, 2 + 3 * 16 + 5].tolist() == [255, 0, 0]
    # The image cell shows the de-normalised image.
    expected = to_uint8_images(images, mean=mean, std=std)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(paths["pca"]))[2:50, 2:66], expected)
    with pytest.raises(ValueError, match="images"):
        save_dense_visualizations(images[:2], feats, tmp_path)
