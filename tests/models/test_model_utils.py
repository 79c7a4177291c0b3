from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightly_cotap.models.utils import (
    foreground_mask_from_attention,
    spherical_kmeans,
    spherical_kmeans_objective,
)


def _gaussian_blur_reference(x: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """Independent 2D Gaussian blur with reflect padding. (B, H, W) -> (B, H, W)."""
    r = kernel_size // 2
    coords = torch.arange(kernel_size, dtype=torch.float64) - r
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None]
    padded = F.pad(x[:, None].double(), (r, r, r, r), mode="reflect")
    return F.conv2d(padded, kernel)[:, 0]


def _check_mask_properties(att: Tensor, mask: Tensor, keep_mass: float) -> None:
    """Kept patches have the highest attention and hold ~keep_mass of the mass."""
    for a, m in zip(att.flatten(1), mask.flatten(1)):
        kept, dropped = a[m], a[~m]
        assert kept.numel() > 0
        if dropped.numel() > 0:
            assert kept.min() >= dropped.max()
        frac = kept.sum() / a.sum()
        # The smallest prefix (by attention) reaching keep_mass.
        assert frac >= keep_mass - 1e-6
        assert frac - kept.min() / a.sum() < keep_mass + 1e-6


class TestForegroundMask:
    @pytest.mark.parametrize("keep_mass", [0.6, 0.3, 0.9])
    def test_keeps_top_patches_and_mass_without_blur(self, keep_mass: float) -> None:
        torch.manual_seed(0)
        att = torch.rand(8, 6 * 7) ** 3
        mask = foreground_mask_from_attention(
            att, grid_size=(6, 7), keep_mass=keep_mass, blur_kernel_size=1
        )
        assert mask.shape == (8, 6, 7) and mask.dtype == torch.bool
        _check_mask_properties(att, mask, keep_mass)

    def test_default_blur_and_60_percent(self) -> None:
        torch.manual_seed(1)
        att = torch.rand(4, 14, 14).softmax(dim=0) ** 2
        mask = foreground_mask_from_attention(att)
        blurred = _gaussian_blur_reference(att, kernel_size=7, sigma=0.6)
        _check_mask_properties(blurred, mask, 0.6)
        # Roughly 60% of the raw mass as well, and not everything.
        raw_frac = (att * mask).sum(dim=(1, 2)) / att.sum(dim=(1, 2))
        assert ((raw_frac > 0.45) & (raw_frac < 0.8)).all()
        assert (mask.flatten(1).float().mean(1) < 1.0).all()

    def test_flat_and_grid_input_agree(self) -> None:
        att = torch.rand(3, 5, 4)
        a = foreground_mask_from_attention(att)
        b = foreground_mask_from_attention(att.flatten(1), grid_size=(5, 4))
        assert torch.equal(a, b)

    def test_peaked_attention_keeps_peak_region(self) -> None:
        att = torch.full((1, 8, 8), 1e-4)
        att[0, 2:4, 5:7] = 1.0
        mask = foreground_mask_from_attention(att, blur_kernel_size=1)
        expected = torch.zeros(1, 8, 8, dtype=torch.bool)
        expected[0, 2:4, 5:7] = True
        # 3 of the 4 peak cells hold 75% >= 60% of the mass.
        assert mask.sum() == 3 and (mask <= expected).all()

    def test_uniform_and_zero_attention(self) -> None:
        mask = foreground_mask_from_attention(torch.ones(2, 10), (2, 5))
        assert int(mask[0].sum()) == math.ceil(0.6 * 10)
        mask = foreground_mask_from_attention(torch.zeros(2, 3, 3))
        assert mask.all()  # no information: nothing is dropped, no NaN

    def test_small_grids(self) -> None:
        for h, w in [(1, 1), (2, 3), (1, 5)]:
            mask = foreground_mask_from_attention(torch.rand(2, h, w))
            assert mask.shape == (2, h, w) and mask.any()

    def test_half_precision_input(self) -> None:
        att = torch.rand(2, 36)
        a = foreground_mask_from_attention(att.half(), (6, 6), blur_kernel_size=1)
        b = foreground_mask_from_attention(
            att.half().float(), (6, 6), blur_kernel_size=1
        )
        assert torch.equal(a, b)

    def test_invalid(self) -> None:
        with pytest.raises(ValueError, match="grid_size"):
            foreground_mask_from_attention(torch.rand(2, 10))
        with pytest.raises(ValueError, match="grid_size"):
            foreground_mask_from_attention(torch.rand(2, 10), grid_size=(3, 3))
        with pytest.raises(ValueError, match="grid_size"):
            foreground_mask_from_attention(torch.rand(2, 3, 3), grid_size=(9, 1))
        with pytest.raises(ValueError, match="shape"):
            foreground_mask_from_attention(torch.rand(2, 3, 3, 3))
        with pytest.raises(ValueError, match="keep_mass"):
            foreground_mask_from_attention(torch.rand(2, 3, 3), keep_mass=0.0)
        with pytest.raises(ValueError, match="blur_kernel_size"):
            foreground_mask_from_attention(torch.rand(2, 3, 3), blur_kernel_size=4)
        with pytest.raises(ValueError, match="blur_sigma"):
            foreground_mask_from_attention(torch.rand(2, 3, 3), blur_sigma=0.0)


def _clusters(
    num_clusters: int, per_cluster: int, dim: int, noise: float, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(num_clusters, dim, generator=g), dim=1)
    labels = torch.arange(num_clusters).repeat_interleave(per_cluster)
    x = centers[labels] + noise * torch.randn(len(labels), dim, generator=g)
    # Scale does not matter for spherical k-means.
    x = x * torch.rand(len(labels), 1, generator=g).add(0.5)
    perm = torch.randperm(len(labels), generator=g)
    return x[perm], labels[perm], centers


class TestSphericalKMeans:
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_recovers_separated_clusters(self, seed: int) -> None:
        x, labels, true_centers = _clusters(6, 40, 24, noise=0.05, seed=seed)
        g = torch.Generator().manual_seed(seed)
        centers, assignments = spherical_kmeans(x, 6, generator=g)
        assert centers.shape == (6, 24) and assignments.shape == (240,)
        torch.testing.assert_close(centers.norm(dim=1), torch.ones(6))
        # A bijection between true and found clusters.
        pairs = {(int(a), int(b)) for a, b in zip(labels, assignments)}
        assert len(pairs) == 6
        assert len({a for a, _ in pairs}) == 6 and len({b for _, b in pairs}) == 6
        # Centers close to the true directions.
        sims = centers @ true_centers.T
        assert (sims.max(dim=1).values > 0.99).all()

    @pytest.mark.parametrize("init", ["k-means++", "random"])
    def test_objective_never_increases(self, init: str) -> None:
        torch.manual_seed(3)
        x = torch.randn(300, 8)
        objectives = []
        for num_iters in range(0, 12):
            g = torch.Generator().manual_seed(7)
            centers, assignments = spherical_kmeans(
                x, 10, num_iters=num_iters, generator=g, init=init
            )
            objective = float(spherical_kmeans_objective(x, centers))
            # Assignments are the nearest centers.
            sims = F.normalize(x, dim=1) @ centers.T
            assert torch.equal(assignments, sims.argmax(dim=1))
            objectives.append(objective)
        diffs = torch.tensor(objectives).diff()
        assert (diffs <= 1e-6).all(), objectives
        assert objectives[-1] < objectives[0]

    def test_reseeds_empty_clusters(self) -> None:
        a, b, c = torch.eye(3)
        x = torch.stack([a] * 10 + [b] * 10 + [c])
        # Find a seed whose random init picks the same point twice, which leaves a
        # cluster empty after the first assignment.
        for seed in range(1000):
            picks = torch.randperm(21, generator=torch.Generator().manual_seed(seed))[
                :3
            ]
            if len({int(i) // 10 if i < 20 else 2 for i in picks}) < 3:
                break
        else:
            pytest.fail("no seed found")
        centers, assignments = spherical_kmeans(
            x, 3, generator=torch.Generator().manual_seed(seed), init="random"
        )
        assert float(spherical_kmeans_objective(x, centers)) == pytest.approx(0.0)
        assert len(set(assignments.tolist())) == 3

    def test_more_clusters_than_distinct_points(self) -> None:
        x = torch.eye(2).repeat(5, 1)
        centers, assignments = spherical_kmeans(x, 4)
        assert centers.shape == (4, 2) and torch.isfinite(centers).all()
        assert float(spherical_kmeans_objective(x, centers)) == pytest.approx(0.0)

    def test_dtype_and_determinism(self) -> None:
        x = torch.randn(50, 5, dtype=torch.float64)
        c1, a1 = spherical_kmeans(x, 4, generator=torch.Generator().manual_seed(0))
        c2, a2 = spherical_kmeans(x, 4, generator=torch.Generator().manual_seed(0))
        assert c1.dtype == torch.float64 and a1.dtype == torch.long
        assert torch.equal(c1, c2) and torch.equal(a1, a2)

    def test_invalid(self) -> None:
        with pytest.raises(ValueError, match="num_clusters"):
            spherical_kmeans(torch.randn(3, 2), 4)
        with pytest.raises(ValueError, match="num_clusters"):
            spherical_kmeans(torch.randn(3, 2), 0)
        with pytest.raises(ValueError, match=r"\(N, d\)"):
            spherical_kmeans(torch.randn(3), 1)
        with pytest.raises(ValueError, match="NaN"):
            spherical_kmeans(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1)
        with pytest.raises(ValueError, match="init"):
            spherical_kmeans(torch.randn(3, 2), 2, init="kmeans")
        with pytest.raises(ValueError, match="num_iters"):
            spherical_kmeans(torch.randn(3, 2), 2, num_iters=-1)
