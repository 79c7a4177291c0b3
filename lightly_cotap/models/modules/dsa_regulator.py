"""Regulator head and good-neighbour scores of the Dynamic Semantic Adjuster (DSA).

- [0]: Song et al., Dynamic Semantic Adjuster: Alleviating the Crowding Problem in
  Self-Supervised Learning, 2024, https://arxiv.org/abs/2407.13541
- [1]: https://github.com/ZeenSong/DSA (official code, commit 8a1ffcc)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Order of the four (anchor view, candidate view) blocks returned by
#: :class:`DSARegulator` and expected by :class:`~lightly_cotap.loss.DSALoss`.
DSA_BLOCKS: tuple[tuple[int, int], ...] = ((0, 0), (1, 1), (0, 1), (1, 0))


class DSARegulator(nn.Module):
    """Learnable regulator of the Dynamic Semantic Adjuster (DSA) [0].

    The regulator scores every pairwise difference of embeddings with a small MLP
    and turns the scores into a row-normalised aggregation matrix M. In
    :class:`~lightly_cotap.loss.DSALoss` an entry M_ij > 1/2 pulls samples i and j
    together and an entry M_ij < 1/2 pushes them apart.

    For the two views u (``out0``) and v (``out1``) of a batch of N images and
    each block (A, B) in ``DSA_BLOCKS`` = ((u, u), (v, v), (u, v), (v, u)) it
    computes, following the official code [1]:

    1. all differences Delta_ij = A_i - B_j, an (N * N, D) matrix;
    2. an L1 normalisation of every feature column over the N * N rows;
    3. M_ij = r(Delta_ij) with r = Linear(D, H) - ReLU - Linear(H, 1) - ReLU;
    4. an L1 normalisation of every row of the (N, N) matrix M.

    Deviation from the official code (documented defect): for the cross-view
    blocks (u, v) and (v, u) the official code computes the *within-view*
    differences u_i - u_j and v_i - v_j, so that M^{uv} equals M^{uu} and M^{vu}
    equals M^{vv}. This implementation uses the cross-view differences u_i - v_j
    and v_i - u_j by default; ``cross_view_differences=False`` reproduces the
    code.

    Only the difference-based regulator (``discriminator2`` in [1]) is
    implemented; the unused concatenation variant of the code is not.

    - [0]: Song et al., Dynamic Semantic Adjuster: Alleviating the Crowding
      Problem in Self-Supervised Learning, 2024, https://arxiv.org/abs/2407.13541
    - [1]: https://github.com/ZeenSong/DSA

    Attributes:
        input_dim:
            Dimension D of the embeddings (64 in [1]).
        hidden_dim:
            Hidden dimension H of the regulator MLP (``input_dim`` in [1]).
        cross_view_differences:
            If True (default), the cross-view blocks score u_i - v_j. If False,
            they reuse the within-view differences like the official code.
        eps:
            Floor of the L1 norms in steps 2 and 4.

    Examples:
        >>> regulator = DSARegulator(input_dim=64)
        >>> z0, z1 = projection(backbone(view0)), projection(backbone(view1))
        >>> aggregation = regulator(z0, z1)  # (4, N, N)
        >>> loss = criterion(out0=z0, out1=z1, aggregation=aggregation, ...)
    """

    def __init__(
        self,
        input_dim: int = 64,
        hidden_dim: int | None = None,
        cross_view_differences: bool = True,
        eps: float = 1e-12,
    ) -> None:
        """Initializes the DSARegulator with the specified parameters.

        Args:
            input_dim:
                Dimension of the embeddings.
            hidden_dim:
                Hidden dimension of the MLP. Defaults to ``input_dim``.
            cross_view_differences:
                Score cross-view differences in the cross-view blocks.
            eps:
                Floor of the L1 norms.

        Raises:
            ValueError: If ``input_dim`` or ``hidden_dim`` is not positive or
                ``eps`` is negative.
        """
        super().__init__()
        hidden_dim = input_dim if hidden_dim is None else hidden_dim
        if input_dim < 1:
            raise ValueError(f"input_dim must be positive, got {input_dim}.")
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be positive, got {hidden_dim}.")
        if eps < 0:
            raise ValueError(f"eps must be non-negative, got {eps}.")
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.cross_view_differences = cross_view_differences
        self.eps = eps
        self.mlp = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, 1),
            nn.ReLU(),
        )

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """Computes the four aggregation matrices.

        Args:
            out0:
                Embeddings of the first views, before L2 normalisation.
                Shape: (N, D)
            out1:
                Embeddings of the second views, before L2 normalisation.
                Shape: (N, D)

        Returns:
            The row-normalised aggregation matrices of the blocks in
            ``DSA_BLOCKS`` order, each row summing to 1 (or 0 if the MLP scored
            the whole row 0). Shape: (4, N, N)

        Raises:
            ValueError: If the inputs are not (N, input_dim) tensors of the same
                shape.
        """
        if out0.ndim != 2 or out0.shape != out1.shape:
            raise ValueError(
                "out0 and out1 must both have shape (N, D), got "
                f"{tuple(out0.shape)} and {tuple(out1.shape)}."
            )
        if out0.shape[1] != self.input_dim:
            raise ValueError(
                f"Expected embeddings of dimension input_dim={self.input_dim}, "
                f"got shape {tuple(out0.shape)}."
            )
        views = (out0, out1)
        differences = []
        for anchor, candidate in DSA_BLOCKS:
            if not self.cross_view_differences:
                # Official code: the cross-view blocks use within-view differences.
                candidate = anchor
            differences.append(views[anchor][:, None, :] - views[candidate][None, :, :])
        delta = torch.stack(differences)  # (4, N, N, D)
        # L1-normalise each feature column over the N * N rows of every block.
        delta = delta / delta.abs().sum(dim=(1, 2), keepdim=True).clamp_min(self.eps)
        scores = self.mlp(delta).squeeze(-1)  # (4, N, N)
        # L1-normalise the rows (the scores are non-negative after the ReLU).
        aggregation: Tensor = scores / scores.sum(dim=2, keepdim=True).clamp_min(
            self.eps
        )
        return aggregation


def knn_adjacency(features: Tensor, k: int) -> Tensor:
    """Returns the cosine k-nearest-neighbour adjacency matrix of a batch.

    Args:
        features:
            Features of N samples (need not be normalised). Shape: (N, D)
        k:
            Number of neighbours per sample; the sample itself is excluded.

    Returns:
        Boolean matrix A with A[i, j] = True iff j is one of the k nearest
        neighbours of i (cosine similarity; ties broken by ``torch.topk``).
        Shape: (N, N)

    Raises:
        ValueError: If ``features`` is not 2-D or ``k`` is not in [1, N - 1].
    """
    if features.ndim != 2:
        raise ValueError(
            f"features must have shape (N, D), got {tuple(features.shape)}."
        )
    n = features.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(
            f"k must be in [1, N - 1] = [1, {n - 1}] for a batch of N={n} samples, "
            f"got k={k}."
        )
    normalized = nn.functional.normalize(features.detach().float(), dim=1)
    similarity = normalized @ normalized.T
    eye = torch.eye(n, dtype=torch.bool, device=features.device)
    similarity = similarity.masked_fill(eye, float("-inf"))
    indices = similarity.topk(k, dim=1).indices
    adjacency = torch.zeros(n, n, dtype=torch.bool, device=features.device)
    adjacency.scatter_(1, indices, True)
    return adjacency


def good_neighbor_scores(
    features: Tensor | None = None,
    k: int = 20,
    mu: int = 1,
    adjacency: Tensor | None = None,
) -> Tensor:
    """Returns the DSA good-neighbour score of every sample, a measure of inlierness.

    For anchor i with k nearest neighbours N(i) (cosine, self excluded), the
    neighbour j is "good" if more than ``mu`` of j's own neighbours l have i as
    a neighbour, ``c_ij = |{l in N(j) : i in N(l)}| > mu``. The score is
    ``s_i = |{good neighbours of i}| / k`` in [0, 1]; outliers have few good
    neighbours [0]. This is the vectorised form of ``get_goodneighbor`` in the
    official code [1]: with A the adjacency matrix, c_ij = (A @ A)[j, i], so
    s = (A * ((A @ A).T > mu)).sum(1) / k at O(N^3 / word) instead of Python loops.

    The official code takes the features of the un-augmented image from a frozen
    reference encoder. Pass features of a frozen self-supervised or EMA network
    here; the official code's ImageNet-supervised ResNet leaks labels.

    - [0]: Song et al., Dynamic Semantic Adjuster, 2024,
      https://arxiv.org/abs/2407.13541
    - [1]: https://github.com/ZeenSong/DSA

    Args:
        features:
            Reference features of N samples. Shape: (N, D)
        k:
            Number of nearest neighbours (``yeta`` = 20 in [1]).
        mu:
            Threshold on the shared-neighbour count (``mu`` = 1 in [1]).
        adjacency:
            Precomputed boolean kNN adjacency with exactly ``k`` True entries
            per row, instead of ``features``. Shape: (N, N)

    Returns:
        Good-neighbour scores (float32, no gradient). Shape: (N,)

    Raises:
        ValueError: If not exactly one of ``features`` and ``adjacency`` is
            given, or on invalid ``k``, ``mu`` or shapes.
    """
    if (features is None) == (adjacency is None):
        raise ValueError("Pass exactly one of features and adjacency.")
    if mu < 0:
        raise ValueError(f"mu must be non-negative, got {mu}.")
    if adjacency is None:
        assert features is not None
        adjacency = knn_adjacency(features, k=k)
    else:
        n = adjacency.shape[0]
        if adjacency.ndim != 2 or adjacency.shape[1] != n:
            raise ValueError(
                f"adjacency must have shape (N, N), got {tuple(adjacency.shape)}."
            )
        if not 1 <= k <= max(n - 1, 0):
            raise ValueError(f"k must be in [1, N - 1] for N={n}, got k={k}.")
    a = adjacency.float()
    shared = a @ a  # shared[j, i] = |{l in N(j) : i in N(l)}|
    good = a * (shared.T > mu).float()
    return good.sum(dim=1) / k
