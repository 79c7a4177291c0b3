"""Loss of the Dynamic Semantic Adjuster (DSA).

Over 400 lines: one loss and its two term functions; most of the length is the
documentation of the choices that differ from the authors' code.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from lightly.loss import NTXentLoss
from torch import Tensor, nn

from lightly_cotap.models.modules.dsa_regulator import DSA_BLOCKS, good_neighbor_scores


class DSALossComponents(NamedTuple):
    """The components of :class:`DSALoss`; ``total`` is what ``forward`` returns.

    Attributes:
        total: ``base + lambda1 * weighted + lambda2 * regularization``.
        base: The NT-Xent term.
        weighted: The weighted aggregation / separation term (before lambda1).
        regularization: The regulator regularisation (before lambda2).
    """

    total: Tensor
    base: Tensor
    weighted: Tensor
    regularization: Tensor


class DSALoss(nn.Module):
    """Implementation of the Dynamic Semantic Adjuster (DSA) loss [0] on top of SimCLR.

    This implementation follows the code published by the authors [1]
    (``ContrastivePlus`` in ``methods/contrastive.py`` and ``methods/dsa.py``):

        L = L_NTXent(u, v) + lambda1 * L_w + lambda2 * R

    - L_NTXent is Lightly's :class:`~lightly.loss.NTXentLoss` with temperature tau.
    - L_w is the weighted aggregation / separation term over the four blocks
      (A, B) in ((u, u), (v, v), (u, v), (v, u)) with L2-normalised embeddings
      and the aggregation matrices M of a
      :class:`~lightly_cotap.models.modules.DSARegulator`:

          L_w = log(1 + 1/4 sum_(A,B) 1/N^2 sum_ij
                    exp(s_i * ||A_i - B_j|| * (2 M^AB_ij - 1) / tau_w))

      Entries with M_ij > 1/2 grow with the distance and pull i and j together;
      entries with M_ij < 1/2 decay with it and push them apart. s_i is the
      good-neighbour score of anchor i (see
      :func:`~lightly_cotap.models.modules.good_neighbor_scores`), which
      down-weights outliers. The diagonal terms of the same-view blocks are
      dropped but, as in [1], still counted in the 1/N^2 mean.
    - R = sum_(A,B) ||M^AB - M_ref^AB||_F pulls the regulator towards the prior
      M_ref_ij = exp(-||a_i - b_j|| / tau_ref) of L2-normalised features a, b of
      the two views from a frozen reference encoder.

    Choices and deviations from the official code:

    - Reference encoder: the code uses an ImageNet-*supervised* ResNet-18 (with a
      re-initialised first conv), which leaks labels into "self-supervised"
      training. Pass features of a frozen self-supervised network or of an EMA
      copy of the model (as in the examples) instead. The reference features are
      detached here; the code's ``requires_grad_ = False`` is an attribute
      assignment, not a call.
    - The cross-view regulator defect is fixed in
      :class:`~lightly_cotap.models.modules.DSARegulator`
      (``cross_view_differences``).
    - The code's ``-1e9`` diagonal mask becomes an exact exclusion, and the
      weighted term is evaluated with ``logsumexp``, so that ``normalize=False``
      cannot overflow. Values equal the code's.
    - R is the sum of the four Frobenius norms as in ``ContrastivePlus`` (the
      class the code trains with); the unused ``SimCLR`` class divides it by 4.
    - M_ref is not row-normalised in the code while M is, so the two live on
      different scales. This is kept by default (minimising ||M - M_ref|| over
      row-normalised M concentrates each row on the nearest reference
      neighbours, which is what produces aggregation); ``normalize_reference=True``
      L1-normalises the rows of M_ref as well.
    - gather_distributed only affects the NT-Xent term. The DSA terms compare
      samples of the local batch only, as in the official DDP code.

    - [0]: Song et al., Dynamic Semantic Adjuster: Alleviating the Crowding
      Problem in Self-Supervised Learning, 2024, https://arxiv.org/abs/2407.13541
    - [1]: https://github.com/ZeenSong/DSA

    Attributes:
        temperature:
            Temperature tau of the NT-Xent term (0.5 in [1]).
        lambda1:
            Weight of the weighted aggregation / separation term (1.0 in [1]).
        lambda2:
            Weight of the regulator regularisation (0.01 in [1]).
        weight_temperature:
            Temperature tau_w of the weighted term (0.5 in [1]).
        reference_temperature:
            Temperature tau_ref of the prior M_ref (``tau`` = 0.5 in [1]).
        k:
            Number of neighbours of the good-neighbour score (20 in [1]).
        mu:
            Threshold of the good-neighbour score (1 in [1]).
        normalize:
            L2-normalise the embeddings in the weighted term (True in [1]).
        normalize_reference:
            L1-normalise the rows of M_ref (False in [1]).
        gather_distributed:
            Gather negatives from all processes in the NT-Xent term.

    Examples:
        >>> criterion = DSALoss()
        >>> regulator = DSARegulator(input_dim=64)
        >>> z0, z1 = model(view0), model(view1)
        >>> with torch.no_grad():
        ...     r0, r1, r_origin = reference(view0), reference(view1), reference(origin)
        >>> loss = criterion(
        ...     out0=z0, out1=z1, aggregation=regulator(z0, z1),
        ...     reference0=r0, reference1=r1, reference_origin=r_origin,
        ... )
    """

    def __init__(
        self,
        temperature: float = 0.5,
        lambda1: float = 1.0,
        lambda2: float = 0.01,
        weight_temperature: float = 0.5,
        reference_temperature: float = 0.5,
        k: int = 20,
        mu: int = 1,
        normalize: bool = True,
        normalize_reference: bool = False,
        gather_distributed: bool = False,
    ) -> None:
        """Initializes the DSALoss with the specified parameters.

        Args:
            temperature:
                Temperature of the NT-Xent term.
            lambda1:
                Weight of the weighted aggregation / separation term.
            lambda2:
                Weight of the regulator regularisation.
            weight_temperature:
                Temperature of the weighted term.
            reference_temperature:
                Temperature of the reference prior.
            k:
                Number of neighbours of the good-neighbour score.
            mu:
                Threshold of the good-neighbour score.
            normalize:
                L2-normalise the embeddings in the weighted term.
            normalize_reference:
                L1-normalise the rows of the reference prior.
            gather_distributed:
                Gather negatives from all processes in the NT-Xent term.

        Raises:
            ValueError: If a temperature is too close to zero, a weight is
                negative, ``k < 1``, ``mu < 0``, or gather_distributed is True
                but torch.distributed is not available.
        """
        super().__init__()
        for name, value in (
            ("weight_temperature", weight_temperature),
            ("reference_temperature", reference_temperature),
        ):
            if abs(value) < 1e-8:
                raise ValueError(f"Illegal {name}: abs({value}) < 1e-8")
        for name, value in (("lambda1", lambda1), ("lambda2", lambda2)):
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}.")
        if k < 1:
            raise ValueError(f"k must be positive, got {k}.")
        if mu < 0:
            raise ValueError(f"mu must be non-negative, got {mu}.")
        # NTXentLoss validates the temperature and gather_distributed.
        self.ntxent = NTXentLoss(
            temperature=temperature, gather_distributed=gather_distributed
        )
        self.temperature = temperature
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.weight_temperature = weight_temperature
        self.reference_temperature = reference_temperature
        self.k = k
        self.mu = mu
        self.normalize = normalize
        self.normalize_reference = normalize_reference
        self.gather_distributed = gather_distributed

    def forward(
        self,
        *,
        out0: Tensor,
        out1: Tensor,
        aggregation: Tensor,
        reference0: Tensor,
        reference1: Tensor,
        reference_origin: Tensor | None = None,
        scores: Tensor | None = None,
    ) -> Tensor:
        """Computes the DSA loss.

        Args:
            out0:
                Embeddings of the first views (e.g. BN(projection)). Shape: (N, D)
            out1:
                Embeddings of the second views. Shape: (N, D)
            aggregation:
                Aggregation matrices of the regulator for ``out0`` and ``out1``,
                in ``DSA_BLOCKS`` order, entries in [0, 1]. Shape: (4, N, N)
            reference0:
                Frozen reference features of the first views (detached here).
                Shape: (N, R)
            reference1:
                Frozen reference features of the second views. Shape: (N, R)
            reference_origin:
                Frozen reference features of the un-augmented images, used for
                the good-neighbour scores. Shape: (N, R')
            scores:
                Precomputed good-neighbour scores instead of
                ``reference_origin``. Shape: (N,)

        Returns:
            The total loss (a scalar).

        Raises:
            ValueError: On inconsistent shapes, if not exactly one of
                ``reference_origin`` and ``scores`` is given, or if the batch has
                at most ``k`` samples.
        """
        return self.forward_components(
            out0=out0,
            out1=out1,
            aggregation=aggregation,
            reference0=reference0,
            reference1=reference1,
            reference_origin=reference_origin,
            scores=scores,
        ).total

    def forward_components(
        self,
        *,
        out0: Tensor,
        out1: Tensor,
        aggregation: Tensor,
        reference0: Tensor,
        reference1: Tensor,
        reference_origin: Tensor | None = None,
        scores: Tensor | None = None,
    ) -> DSALossComponents:
        """Computes the DSA loss and its terms (for logging).

        Args:
            out0: See :meth:`forward`.
            out1: See :meth:`forward`.
            aggregation: See :meth:`forward`.
            reference0: See :meth:`forward`.
            reference1: See :meth:`forward`.
            reference_origin: See :meth:`forward`.
            scores: See :meth:`forward`.

        Returns:
            ``DSALossComponents(total, base, weighted, regularization)``;
            ``weighted`` and ``regularization`` are unweighted (before lambda1 /
            lambda2), ``total`` is what :meth:`forward` returns.

        Raises:
            ValueError: See :meth:`forward`.
        """
        if out0.ndim != 2 or out0.shape != out1.shape:
            raise ValueError(
                "out0 and out1 must both have shape (N, D), got "
                f"{tuple(out0.shape)} and {tuple(out1.shape)}."
            )
        n = out0.shape[0]
        if n < 2:
            raise ValueError(f"DSALoss needs a batch of at least 2, got N={n}.")
        if aggregation.shape != (4, n, n):
            raise ValueError(
                f"aggregation must have shape (4, N, N) = (4, {n}, {n}), got "
                f"{tuple(aggregation.shape)}."
            )
        for name, ref in (("reference0", reference0), ("reference1", reference1)):
            if ref.ndim != 2 or ref.shape[0] != n:
                raise ValueError(
                    f"{name} must have shape (N, R) with N={n}, got {tuple(ref.shape)}."
                )
        if reference0.shape != reference1.shape:
            raise ValueError(
                "reference0 and reference1 must have the same shape, got "
                f"{tuple(reference0.shape)} and {tuple(reference1.shape)}."
            )
        if (reference_origin is None) == (scores is None):
            raise ValueError("Pass exactly one of reference_origin and scores.")
        if scores is None:
            assert reference_origin is not None
            if reference_origin.ndim != 2 or reference_origin.shape[0] != n:
                raise ValueError(
                    f"reference_origin must have shape (N, R) with N={n}, got "
                    f"{tuple(reference_origin.shape)}."
                )
            if self.k > n - 1:
                raise ValueError(
                    f"k={self.k} neighbours need a batch of more than k samples, "
                    f"got N={n}. Lower k or increase the batch size."
                )
            scores = good_neighbor_scores(reference_origin, k=self.k, mu=self.mu)
        elif scores.shape != (n,):
            raise ValueError(
                f"scores must have shape (N,) = ({n},), got {tuple(scores.shape)}."
            )
        scores = scores.detach().to(out0.dtype)

        base: Tensor = self.ntxent(out0, out1)
        weighted = weighted_aggregation_loss(
            out0=out0,
            out1=out1,
            aggregation=aggregation,
            scores=scores,
            temperature=self.weight_temperature,
            normalize=self.normalize,
        )
        reference = reference_aggregation(
            reference0.detach(),
            reference1.detach(),
            temperature=self.reference_temperature,
            row_normalize=self.normalize_reference,
        ).to(aggregation.dtype)
        regularization = torch.linalg.matrix_norm(aggregation - reference).sum()
        total = base + self.lambda1 * weighted + self.lambda2 * regularization
        return DSALossComponents(
            total=total, base=base, weighted=weighted, regularization=regularization
        )


def weighted_aggregation_loss(
    *,
    out0: Tensor,
    out1: Tensor,
    aggregation: Tensor,
    scores: Tensor,
    temperature: float = 0.5,
    normalize: bool = True,
) -> Tensor:
    """Returns the weighted aggregation / separation term L_w of DSA.

    L_w = log(1 + 1/4 sum_(A,B) 1/N^2 sum_ij exp(s_i d_ij (2 M_ij - 1) / tau))
    over the blocks in ``DSA_BLOCKS`` order, without the diagonal of the
    same-view blocks (which still count in the 1/N^2 mean, as in the official
    code). Evaluated with ``logsumexp``.

    Args:
        out0:
            Embeddings of the first views. Shape: (N, D)
        out1:
            Embeddings of the second views. Shape: (N, D)
        aggregation:
            Aggregation matrices M. Shape: (4, N, N)
        scores:
            Good-neighbour scores s. Shape: (N,)
        temperature:
            Temperature tau.
        normalize:
            L2-normalise the embeddings before the distances d_ij.

    Returns:
        The scalar L_w.
    """
    n = out0.shape[0]
    if normalize:
        out0 = nn.functional.normalize(out0, dim=1)
        out1 = nn.functional.normalize(out1, dim=1)
    views = (out0, out1)
    distances = torch.stack(
        [
            torch.cdist(views[a], views[b], compute_mode="donot_use_mm_for_euclid_dist")
            for a, b in DSA_BLOCKS
        ]
    )  # (4, N, N)
    exponent = scores[None, :, None] * distances * (2 * aggregation - 1) / temperature
    same_view = torch.tensor([a == b for a, b in DSA_BLOCKS], device=out0.device)
    eye = torch.eye(n, dtype=torch.bool, device=out0.device)
    drop = same_view[:, None, None] & eye[None]
    exponent = exponent.masked_fill(drop, float("-inf"))
    log_mean = torch.logsumexp(exponent.flatten(), dim=0) - math.log(4 * n * n)
    # log(1 + mean) = logaddexp(0, log(mean))
    loss: Tensor = torch.logaddexp(torch.zeros_like(log_mean), log_mean)
    return loss


def reference_aggregation(
    reference0: Tensor,
    reference1: Tensor,
    temperature: float = 0.5,
    row_normalize: bool = False,
) -> Tensor:
    """Returns the DSA reference prior M_ref of the four blocks.

    M_ref_ij = exp(-||a_i - b_j|| / temperature) for L2-normalised reference
    features a, b of the blocks in ``DSA_BLOCKS`` order.

    Args:
        reference0:
            Reference features of the first views. Shape: (N, R)
        reference1:
            Reference features of the second views. Shape: (N, R)
        temperature:
            Temperature of the prior.
        row_normalize:
            L1-normalise each row (not done in the official code).

    Returns:
        The prior. Shape: (4, N, N)
    """
    views = (
        nn.functional.normalize(reference0, dim=1),
        nn.functional.normalize(reference1, dim=1),
    )
    prior = torch.stack(
        [
            torch.exp(
                -torch.cdist(
                    views[a], views[b], compute_mode="donot_use_mm_for_euclid_dist"
                )
                / temperature
            )
            for a, b in DSA_BLOCKS
        ]
    )
    if row_normalize:
        prior = prior / prior.sum(dim=2, keepdim=True)
    return prior
