from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightly_cotap.models.kmeans import spherical_kmeans, spherical_kmeans_objective


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

    @pytest.mark.parametrize("init", ["k-means++", "random"])
    def test_result_is_a_fixed_point_of_the_iteration(self, init: str) -> None:
        # Random data needs several iterations; with tol=0 the result must be
        # converged: the centers are the normalised means of their points and every
        # point is assigned to its most similar center.
        torch.manual_seed(5)
        x = torch.randn(400, 6, dtype=torch.float64)
        g = torch.Generator().manual_seed(1)
        centers, assignments = spherical_kmeans(x, 12, generator=g, init=init)
        xn = F.normalize(x, dim=1)
        assert torch.equal(assignments, (xn @ centers.T).argmax(dim=1))
        sums = torch.zeros_like(centers).index_add_(0, assignments, xn)
        torch.testing.assert_close(centers, F.normalize(sums, dim=1))
        one_step, _ = spherical_kmeans(
            x, 12, num_iters=1, generator=torch.Generator().manual_seed(1), init=init
        )
        assert not torch.allclose(one_step, centers)  # the data needs > 1 iteration

    def test_as_many_clusters_as_points(self) -> None:
        x = torch.randn(5, 3)
        centers, assignments = spherical_kmeans(x, 5)
        assert sorted(assignments.tolist()) == [0, 1, 2, 3, 4]
        assert float(spherical_kmeans_objective(x, centers)) == pytest.approx(
            0.0, abs=1e-6
        )

    def test_progress_bar(self, capsys: pytest.CaptureFixture[str]) -> None:
        x = torch.randn(60, 4)
        quiet = spherical_kmeans(x, 3, generator=torch.Generator().manual_seed(0))
        shown = spherical_kmeans(
            x, 3, generator=torch.Generator().manual_seed(0), progress=True
        )
        assert torch.equal(quiet[0], shown[0]) and torch.equal(quiet[1], shown[1])
        assert "spherical k-means" in capsys.readouterr().err

    def test_objective_matches_its_formula(self) -> None:
        torch.manual_seed(2)
        x, centers = torch.randn(30, 5, dtype=torch.float64), torch.randn(4, 5)
        cos = torch.tensor(
            [
                [float(F.cosine_similarity(p, c.double(), dim=0)) for c in centers]
                for p in x
            ],
            dtype=torch.float64,
        )
        expected = (1.0 - cos.max(dim=1).values).mean()
        torch.testing.assert_close(
            spherical_kmeans_objective(x, centers.double()), expected
        )
