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


def _kmeans_plus_plus_reference(
    xn: Tensor, num_clusters: int, generator: torch.Generator
) -> Tensor:
    """D^2 seeding from its definition, drawing from ``generator`` in the documented
    order: a uniform first center, then each next center with probability
    proportional to the squared cosine distance ``1 - cos`` to its nearest chosen
    center (uniform when every point coincides with a chosen center).
    """
    n = xn.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    for _ in range(1, num_clusters):
        nearest = torch.stack(
            [torch.tensor([1.0 - float(p @ xn[c]) for c in chosen]).min() for p in xn]
        ).clamp_min(0.0)
        weights = nearest.double() ** 2
        if float(weights.sum()) == 0.0:
            chosen.append(int(torch.randint(n, (1,), generator=generator)))
        else:
            chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
    return xn[chosen]


def _lloyd_reference(
    xn: Tensor, centers: Tensor, num_iters: int, tol: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Spherical Lloyd iterations from the docstring, cluster by cluster: a center
    becomes the normalised sum of its points (kept if they sum to ~0), an empty
    cluster takes the worst-fitted point (lowest similarity to its center), and the
    iteration stops when the assignments repeat or the objective improves by no
    more than ``tol``.
    """
    best, assignments = (xn @ centers.T).max(dim=1)
    objective = float((1.0 - best).mean())
    for _ in range(num_iters):
        new_centers = centers.clone()
        empty = []
        for k in range(len(centers)):
            members = xn[assignments == k]
            if len(members) == 0:
                empty.append(k)
                continue
            total = members.sum(dim=0)
            if float(total.norm()) > 1e-12:
                new_centers[k] = total / total.norm()
        worst_first = torch.argsort(best)
        for k, point in zip(empty, worst_first.tolist()):
            new_centers[k] = xn[point]
        centers = new_centers
        new_best, new_assignments = (xn @ centers.T).max(dim=1)
        new_objective = float((1.0 - new_best).mean())
        unchanged = torch.equal(new_assignments, assignments)
        improvement = objective - new_objective
        best, assignments, objective = new_best, new_assignments, new_objective
        if unchanged or improvement <= tol:
            break
    return centers, assignments


def _seeding_cases() -> list[tuple[str, Tensor, int]]:
    g = torch.Generator().manual_seed(11)
    spread = torch.randn(30, 4, generator=g, dtype=torch.float64)
    # Tight bundle: squared distances ~1e-4, weights summing to < 1.
    tight = torch.ones(25, 3, dtype=torch.float64) + 0.02 * torch.randn(
        25, 3, generator=g, dtype=torch.float64
    )
    # Few distinct points and antipodes: exhausted D^2 weights, zero-sum clusters.
    lattice = torch.tensor(
        [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]],
        dtype=torch.float64,
    ).repeat(2, 1)
    small = torch.randn(9, 3, generator=g, dtype=torch.float64)
    # Single-point clusters whose center is not yet on their point, and clusters
    # whose points sum to a vector shorter than 1.
    corners = torch.tensor(
        [[1, -1, 0], [-1, 0, 0], [0, -1, 1], [1, -1, -1], [0, 1, -1], [-1, 1, -1]],
        dtype=torch.float64,
    )
    # e0 and -e0 tie between all centers in the plane of the other points, so a
    # cluster can hold just the two of them (they sum to zero).
    angles = torch.tensor([-0.287, -0.567, 2.02, 2.124, -0.401, -1.774])
    antipodes = torch.cat(
        [
            torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]),
            torch.stack([torch.zeros(6), angles.cos(), angles.sin()], dim=1),
        ]
    ).double()
    return [
        ("spread", spread, 7),
        ("tight", tight, 5),
        ("lattice", lattice, 7),
        ("small", small, 6),
        ("corners-3", corners, 3),
        ("corners-4", corners, 4),
        ("antipodes", antipodes, 3),
    ]


class TestSphericalKMeansAgainstReference:
    @pytest.mark.parametrize("case", _seeding_cases(), ids=lambda c: c[0])
    @pytest.mark.parametrize("seed", range(4))
    def test_kmeans_plus_plus_seeding(
        self, case: tuple[str, Tensor, int], seed: int
    ) -> None:
        _, x, k = case
        centers, _ = spherical_kmeans(
            x, k, num_iters=0, generator=torch.Generator().manual_seed(seed)
        )
        expected = _kmeans_plus_plus_reference(
            F.normalize(x, dim=1), k, torch.Generator().manual_seed(seed)
        )
        torch.testing.assert_close(centers, expected, rtol=0, atol=1e-12)

    @pytest.mark.parametrize("seed", range(3))
    def test_random_init_is_a_random_subset(self, seed: int) -> None:
        x = torch.randn(20, 3, dtype=torch.float64)
        centers, _ = spherical_kmeans(
            x,
            5,
            num_iters=0,
            generator=torch.Generator().manual_seed(seed),
            init="random",
        )
        perm = torch.randperm(20, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(
            centers, F.normalize(x, dim=1)[perm[:5]], rtol=0, atol=1e-12
        )

    @pytest.mark.parametrize("case", _seeding_cases(), ids=lambda c: c[0])
    @pytest.mark.parametrize("init", ["k-means++", "random"])
    @pytest.mark.parametrize("seed", range(5))
    def test_iterations_match_reference(
        self, case: tuple[str, Tensor, int], init: str, seed: int
    ) -> None:
        # Few points per cluster: single-point and empty clusters occur.
        _, x, k = case
        xn = F.normalize(x, dim=1)
        initial, _ = spherical_kmeans(
            x, k, num_iters=0, generator=torch.Generator().manual_seed(seed), init=init
        )
        for num_iters in (1, 2, 3, 300):
            centers, assignments = spherical_kmeans(
                x,
                k,
                num_iters=num_iters,
                generator=torch.Generator().manual_seed(seed),
                init=init,
            )
            expected_centers, expected_assignments = _lloyd_reference(
                xn, initial, num_iters
            )
            torch.testing.assert_close(centers, expected_centers, rtol=0, atol=1e-12)
            assert torch.equal(assignments, expected_assignments)
        # The defaults: 300 iterations at most, tol = 0.
        default = spherical_kmeans(
            x, k, generator=torch.Generator().manual_seed(seed), init=init
        )
        assert torch.equal(default[0], centers) and torch.equal(default[1], assignments)

    def test_tol_stops_early(self) -> None:
        torch.manual_seed(5)
        x = torch.randn(200, 6, dtype=torch.float64)
        xn = F.normalize(x, dim=1)
        initial, _ = spherical_kmeans(
            x, 8, num_iters=0, generator=torch.Generator().manual_seed(0)
        )
        # tol=0.5 stops after the first iteration.
        for tol in (0.0, 1e-3, 1e-2, 0.5):
            centers, assignments = spherical_kmeans(
                x, 8, generator=torch.Generator().manual_seed(0), tol=tol
            )
            expected = _lloyd_reference(xn, initial, 300, tol=tol)
            torch.testing.assert_close(centers, expected[0], rtol=0, atol=1e-12)
            assert torch.equal(assignments, expected[1])

    def test_tol_is_inclusive(self) -> None:
        # "Stop when the objective improves by no more than tol": with tol equal to
        # the first improvement, the iteration stops after one step.
        torch.manual_seed(6)
        x = torch.randn(100, 4, dtype=torch.float64)
        xn = F.normalize(x, dim=1)
        objectives = []
        for num_iters in (0, 1):
            centers, _ = spherical_kmeans(
                x, 5, num_iters=num_iters, generator=torch.Generator().manual_seed(0)
            )
            objectives.append(float((1.0 - (xn @ centers.T).max(dim=1).values).mean()))
        first_improvement = objectives[0] - objectives[1]
        assert first_improvement > 0
        stopped = spherical_kmeans(
            x, 5, generator=torch.Generator().manual_seed(0), tol=first_improvement
        )
        assert torch.equal(stopped[0], centers)
        more = spherical_kmeans(x, 5, generator=torch.Generator().manual_seed(0))
        assert not torch.equal(more[0], centers)  # the data needs > 1 iteration

    def test_more_points_than_one_similarity_chunk(self) -> None:
        # The similarities are computed in chunks of 65536 rows; every row counts.
        torch.manual_seed(7)
        x = torch.randn(65536 + 7, 2)
        centers, assignments = spherical_kmeans(
            x, 3, num_iters=2, generator=torch.Generator().manual_seed(0)
        )
        expected = (F.normalize(x, dim=1) @ centers.T).argmax(dim=1)
        assert torch.equal(assignments, expected)

    def test_empty_cluster_takes_the_worst_fitted_point(self) -> None:
        # Two copies of e0 seeded as the two centers (uniform pick among identical
        # points): one cluster is empty after the first assignment and must take the
        # point least similar to its center, e2 (cos 0), not e0 + 0.2 e2.
        x = torch.tensor(
            [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.2], [0.0, 0.0, 1.0]],
            dtype=torch.float64,
        )
        xn = F.normalize(x, dim=1)
        for seed in range(200):
            perm = torch.randperm(4, generator=torch.Generator().manual_seed(seed))
            if sorted(perm[:2].tolist()) == [0, 1]:
                break
        else:
            pytest.fail("no seed found")
        centers, assignments = spherical_kmeans(
            x,
            2,
            num_iters=1,
            generator=torch.Generator().manual_seed(seed),
            init="random",
        )
        mean_of_all = F.normalize(xn.sum(dim=0), dim=0)
        empty = 1  # ties go to the first center
        torch.testing.assert_close(centers[1 - empty], mean_of_all)
        torch.testing.assert_close(centers[empty], xn[3])
        assert assignments.tolist() == [0, 0, 0, 1]

    @pytest.mark.parametrize("init", ["k-means++", "random"])
    def test_generator_leaves_the_global_rng_alone(self, init: str) -> None:
        # Includes the uniform pick of an exhausted D^2 seeding (2 distinct points,
        # 3 clusters).
        for x, k in ((torch.randn(20, 3), 4), (torch.eye(2).repeat(3, 1), 3)):
            torch.manual_seed(0)
            expected = torch.rand(4)
            torch.manual_seed(0)
            spherical_kmeans(
                x, k, generator=torch.Generator().manual_seed(1), init=init
            )
            assert torch.equal(torch.rand(4), expected)

    def test_low_precision_input_is_computed_in_float32(self) -> None:
        torch.manual_seed(4)
        x = torch.randn(60, 5).bfloat16()
        centers, assignments = spherical_kmeans(
            x, 4, generator=torch.Generator().manual_seed(0)
        )
        expected, expected_assignments = spherical_kmeans(
            x.float(), 4, generator=torch.Generator().manual_seed(0)
        )
        assert centers.dtype == torch.bfloat16
        assert torch.equal(centers, expected.bfloat16())
        assert torch.equal(assignments, expected_assignments)

    def test_no_progress_bar_by_default(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        spherical_kmeans(torch.randn(30, 3), 3)
        assert capsys.readouterr().err == ""

    def test_progress_bar_counts_to_num_iters(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        spherical_kmeans(torch.randn(30, 3), 3, progress=True)
        err = capsys.readouterr().err
        assert err.lstrip("\r").startswith("spherical k-means:")
        assert "/300 " in err
