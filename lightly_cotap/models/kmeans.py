"""Spherical k-means: k-means with the cosine similarity on unit vectors.

Hand-written because the prototypes need the cosine objective, a CPU generator for a
reproducible seeding and re-seeding of empty clusters; scikit-learn's ``KMeans`` is
Euclidean and not a dependency of the components.

- [0]: Wen et al., Semantic Concentration for Self-Supervised Dense Representations
  Learning, 2025, https://arxiv.org/abs/2509.09429
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm


def _max_similarity(
    x: Tensor, centers: Tensor, chunk_size: int = 65536
) -> tuple[Tensor, Tensor]:
    """Returns the highest cosine similarity and its center index for each row."""
    sims = []
    indices = []
    for start in range(0, x.shape[0], chunk_size):
        s, i = (x[start : start + chunk_size] @ centers.T).max(dim=1)
        sims.append(s)
        indices.append(i)
    return torch.cat(sims), torch.cat(indices)


def _kmeans_plus_plus_init(
    x: Tensor, num_clusters: int, generator: torch.Generator | None
) -> Tensor:
    """k-means++ seeding with the cosine distance 1 - cos on unit vectors."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator, device="cpu"))
    chosen = [first]
    min_dist = (1.0 - x @ x[first]).clamp_min(0.0)
    for _ in range(1, num_clusters):
        weights = min_dist.double().cpu() ** 2
        if float(weights.sum()) <= 0.0:
            # Fewer distinct points than clusters: pick uniformly at random.
            idx = int(torch.randint(n, (1,), generator=generator, device="cpu"))
        else:
            idx = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(idx)
        min_dist = torch.minimum(min_dist, (1.0 - x @ x[idx]).clamp_min(0.0))
    return x[torch.tensor(chosen, device=x.device)].clone()


def spherical_kmeans(
    x: Tensor,
    num_clusters: int,
    num_iters: int = 300,
    generator: torch.Generator | None = None,
    tol: float = 0.0,
    init: str = "k-means++",
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Spherical k-means (k-means with cosine similarity on L2-normalised vectors).

    The rows of ``x`` are L2-normalised; centers are unit vectors. Each iteration
    assigns every point to the center of highest cosine similarity and sets each
    center to the normalised sum of its points. The objective
    ``mean_i (1 - cos(x_i, c_{a_i}))`` never increases: the center update maximises
    the within-cluster cosine sum and the assignment picks the best center.

    Empty clusters are re-seeded with the points that are currently worst fitted
    (lowest similarity to their center, distinct points), which cannot increase the
    objective. CoTAP [0] uses this (with random re-seeding) to initialise the object
    prototypes from a memory bank of pooled block features.

    Args:
        x: Points. Shape: (N, d).
        num_clusters: Number of clusters K, 1 <= K <= N.
        num_iters: Maximum number of (update, assignment) iterations. 0 returns the
            initial centers.
        generator: Optional random generator (CPU) for a reproducible seeding.
        tol: Stop when the objective improves by no more than ``tol``. Iteration
            also stops when the assignments no longer change.
        init: "k-means++" (default, D^2 seeding with the cosine distance) or
            "random" (K distinct random points, as in the official CoTAP code).
        progress: Show a tqdm progress bar.

    Returns:
        Tuple ``(centers, assignments)`` with unit-norm centers of shape (K, d) in the
        dtype of ``x`` and the cluster index of every point, shape (N,), dtype long.

    Raises:
        ValueError: If ``x`` is not 2D, contains non-finite values, or the arguments
            are invalid.
    """
    if x.ndim != 2:
        raise ValueError(f"x must have shape (N, d), got shape {tuple(x.shape)}.")
    n, d = x.shape
    if num_clusters < 1 or num_clusters > n:
        raise ValueError(
            f"num_clusters must be in [1, N] = [1, {n}], got {num_clusters}."
        )
    if num_iters < 0:
        raise ValueError(f"num_iters must be non-negative, got {num_iters}.")
    if tol < 0:
        raise ValueError(f"tol must be non-negative, got {tol}.")
    if init not in ("k-means++", "random"):
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or infinite values.")

    with torch.no_grad():
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xn = F.normalize(x.detach().to(compute_dtype), dim=1)
        if init == "random":
            perm = torch.randperm(n, generator=generator, device="cpu")[:num_clusters]
            centers = xn[perm.to(xn.device)].clone()
        else:
            centers = _kmeans_plus_plus_init(xn, num_clusters, generator)
        best_sim, assignments = _max_similarity(xn, centers)
        objective = float((1.0 - best_sim).mean())

        iterator: Any = range(num_iters)
        if progress:
            iterator = tqdm(iterator, desc="spherical k-means")
        for _ in iterator:
            # Update step.
            sums = torch.zeros_like(centers).index_add_(0, assignments, xn)
            counts = torch.bincount(assignments, minlength=num_clusters)
            norms = sums.norm(dim=1, keepdim=True)
            # A cluster whose points sum to ~0 keeps its center (every unit vector is
            # equally good for it).
            valid = (counts > 0) & (norms.squeeze(1) > 1e-12)
            new_centers = torch.where(
                valid[:, None], sums / norms.clamp_min(1e-12), centers
            )
            empty = torch.nonzero(counts == 0).flatten()
            if empty.numel() > 0:
                # Re-seed empty clusters with the worst-fitted points.
                worst = torch.argsort(best_sim)[: empty.numel()]
                new_centers[empty] = xn[worst]
            centers = new_centers

            # Assignment step.
            new_best_sim, new_assignments = _max_similarity(xn, centers)
            new_objective = float((1.0 - new_best_sim).mean())
            unchanged = bool(torch.equal(new_assignments, assignments))
            improvement = objective - new_objective
            best_sim, assignments, objective = (
                new_best_sim,
                new_assignments,
                new_objective,
            )
            if unchanged or improvement <= tol:
                break

    return centers.to(x.dtype), assignments


def spherical_kmeans_objective(x: Tensor, centers: Tensor) -> Tensor:
    """Spherical k-means objective ``mean_i (1 - max_k cos(x_i, c_k))``.

    Args:
        x: Points. Shape: (N, d).
        centers: Centers. Shape: (K, d).

    Returns:
        Scalar objective (lower is better).
    """
    sims = F.normalize(x, dim=1) @ F.normalize(centers, dim=1).T
    return (1.0 - sims.max(dim=1).values).mean()
