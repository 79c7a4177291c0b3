"""Principal components of a set of vectors, shared by the k-means and the pictures."""

from __future__ import annotations

import torch
from sklearn.decomposition import PCA
from torch import Tensor


def principal_components(x: Tensor, num_components: int) -> Tensor:
    """Principal directions of a set of vectors (scikit-learn's exact ``PCA``).

    The covariance-eigendecomposition solver is exact and deterministic (no
    randomised range finder, no use of the global RNG); the sign of every component
    is fixed so that its largest absolute loading is positive.

    Args:
        x: Vectors, centred internally. Shape: (M, C).
        num_components: Number of components; at most ``min(M, C)`` are returned.

    Returns:
        Components sorted by decreasing variance. Shape: (min(num_components, M, C),
        C), float64.

    Raises:
        ValueError: If ``x`` is not 2-D or ``num_components`` is not positive.
    """
    if x.ndim != 2:
        raise ValueError(f"x must have shape (M, C), got {tuple(x.shape)}.")
    if num_components < 1:
        raise ValueError(f"num_components must be positive, got {num_components}.")
    count = min(num_components, x.shape[0], x.shape[1])
    pca = PCA(n_components=count, svd_solver="covariance_eigh")
    pca.fit(x.detach().double().cpu().numpy())
    return torch.from_numpy(pca.components_.copy())
