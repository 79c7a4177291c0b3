from __future__ import annotations

import math

import pytest
import torch
from lightly.loss import NTXentLoss
from torch import Tensor

from lightly_cotap.loss.dsa_loss import DSALoss, weighted_aggregation_loss
from lightly_cotap.models.modules.dsa_regulator import (
    DSA_BLOCKS,
    DSARegulator,
    good_neighbor_scores,
)


def _ntxent_reference(u: Tensor, v: Tensor, tau: float) -> Tensor:
    n = u.shape[0]
    z = torch.cat([u / u.norm(dim=1, keepdim=True), v / v.norm(dim=1, keepdim=True)])
    total = torch.zeros((), dtype=z.dtype)
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        denom = sum(torch.exp(z[a] @ z[b] / tau) for b in range(2 * n) if b != a)
        total = total - torch.log(torch.exp(z[a] @ z[pos] / tau) / denom)
    return total / (2 * n)


def _dsa_reference(
    u: Tensor,
    v: Tensor,
    m: Tensor,
    r0: Tensor,
    r1: Tensor,
    s: Tensor,
    tau: float,
    tau_w: float,
    tau_ref: float,
    lambda1: float,
    lambda2: float,
) -> Tensor:
    """The DSA objective written term by term from its formula (loops)."""
    n = u.shape[0]
    un = u / u.norm(dim=1, keepdim=True)
    vn = v / v.norm(dim=1, keepdim=True)
    r0n = r0 / r0.norm(dim=1, keepdim=True)
    r1n = r1 / r1.norm(dim=1, keepdim=True)
    views, refs = (un, vn), (r0n, r1n)
    weighted_sum = torch.zeros((), dtype=u.dtype)
    reg = torch.zeros((), dtype=u.dtype)
    for block, (a, b) in enumerate(DSA_BLOCKS):
        block_sum = torch.zeros((), dtype=u.dtype)
        sq = torch.zeros((), dtype=u.dtype)
        for i in range(n):
            for j in range(n):
                ref_ij = torch.exp(-(refs[a][i] - refs[b][j]).norm() / tau_ref)
                sq = sq + (m[block, i, j] - ref_ij) ** 2
                if a == b and i == j:
                    continue
                d = (views[a][i] - views[b][j]).norm()
                block_sum = block_sum + torch.exp(
                    s[i] * d * (2 * m[block, i, j] - 1) / tau_w
                )
        weighted_sum = weighted_sum + block_sum / n**2
        reg = reg + torch.sqrt(sq)
    weighted = torch.log(1 + weighted_sum / 4)
    base = _ntxent_reference(u, v, tau)
    return base + lambda1 * weighted + lambda2 * reg


def _inputs(n: int, d: int, seed: int) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.rand(4, n, n, generator=g, dtype=torch.float64)
    m = (m / m.sum(dim=2, keepdim=True)).requires_grad_()
    m.data[0, 1, 2] = 0.9  # one strongly aggregating entry
    r0 = torch.randn(n, 5, generator=g, dtype=torch.float64)
    r1 = torch.randn(n, 5, generator=g, dtype=torch.float64)
    s = torch.rand(n, generator=g, dtype=torch.float64)
    return u, v, m, r0, r1, s


@pytest.mark.parametrize(
    "tau, tau_w, tau_ref, lambda1, lambda2",
    [(0.5, 0.5, 0.5, 1.0, 0.01), (0.2, 0.3, 0.7, 0.5, 1.0)],
)
def test_dsa_loss_matches_reference(
    tau: float, tau_w: float, tau_ref: float, lambda1: float, lambda2: float
) -> None:
    u, v, m, r0, r1, s = _inputs(n=6, d=4, seed=0)
    criterion = DSALoss(
        temperature=tau,
        lambda1=lambda1,
        lambda2=lambda2,
        weight_temperature=tau_w,
        reference_temperature=tau_ref,
    )
    loss = criterion(
        out0=u, out1=v, aggregation=m, reference0=r0, reference1=r1, scores=s
    )
    expected = _dsa_reference(u, v, m, r0, r1, s, tau, tau_w, tau_ref, lambda1, lambda2)
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, [u, v, m])
    ref_grads = torch.autograd.grad(expected, [u, v, m])
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


def test_dsa_loss_base_term_is_lightly_ntxent() -> None:
    u, v, m, r0, r1, s = _inputs(n=5, d=3, seed=1)
    terms = DSALoss(temperature=0.3).forward_components(
        out0=u, out1=v, aggregation=m, reference0=r0, reference1=r1, scores=s
    )
    torch.testing.assert_close(terms.base, NTXentLoss(temperature=0.3)(u, v))
    torch.testing.assert_close(
        terms.total, terms.base + terms.weighted + 0.01 * terms.regularization
    )
    # lambda1 = lambda2 = 0 gives plain SimCLR.
    plain = DSALoss(temperature=0.3, lambda1=0.0, lambda2=0.0)(
        out0=u, out1=v, aggregation=m, reference0=r0, reference1=r1, scores=s
    )
    torch.testing.assert_close(plain, terms.base)


def test_dsa_loss_scores_from_reference_origin() -> None:
    u, v, m, r0, r1, _ = _inputs(n=12, d=4, seed=2)
    origin = torch.randn(12, 7, dtype=torch.float64)
    criterion = DSALoss(k=3, mu=1)
    loss = criterion(
        out0=u,
        out1=v,
        aggregation=m,
        reference0=r0,
        reference1=r1,
        reference_origin=origin,
    )
    scores = good_neighbor_scores(origin, k=3, mu=1).double()
    expected = criterion(
        out0=u, out1=v, aggregation=m, reference0=r0, reference1=r1, scores=scores
    )
    torch.testing.assert_close(loss, expected)


def test_dsa_loss_normalize_reference_rows() -> None:
    u, v, m, r0, r1, s = _inputs(n=4, d=3, seed=3)
    raw = DSALoss().forward_components(
        out0=u, out1=v, aggregation=m, reference0=r0, reference1=r1, scores=s
    )
    normed = DSALoss(normalize_reference=True).forward_components(
        out0=u, out1=v, aggregation=m, reference0=r0, reference1=r1, scores=s
    )
    # Row-normalised prior on the same simplex as M: a much closer target.
    assert normed.regularization < raw.regularization
    torch.testing.assert_close(normed.weighted, raw.weighted)


@pytest.mark.parametrize("value, sign", [(0.9, 1.0), (0.1, -1.0)])
def test_dsa_sign_aggregation_attracts_separation_repels(
    value: float, sign: float
) -> None:
    """M > 1/2: the loss grows with distance (minimising attracts); M < 1/2 repels."""
    n = 3
    torch.manual_seed(0)
    out1 = torch.randn(n, 4, dtype=torch.float64)
    direction = torch.randn(n, 4, dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    out0 = out1 + t * direction  # all distances ||u_i - v_i|| grow with t
    aggregation = torch.full((4, n, n), value, dtype=torch.float64)
    # Only the cross-view positives (i, i) get the value; the rest are neutral 1/2.
    aggregation[:] = 0.5
    aggregation[2].fill_diagonal_(value)
    aggregation[3].fill_diagonal_(value)
    loss = weighted_aggregation_loss(
        out0=out0,
        out1=out1,
        aggregation=aggregation,
        scores=torch.ones(n, dtype=torch.float64),
        normalize=False,
    )
    (grad,) = torch.autograd.grad(loss, t)
    assert grad.item() * sign > 0
    # A zero score (outlier anchor) removes the pull / push entirely.
    out0 = out1 + t * direction
    loss = weighted_aggregation_loss(
        out0=out0,
        out1=out1,
        aggregation=aggregation,
        scores=torch.zeros(n, dtype=torch.float64),
        normalize=False,
    )
    (grad,) = torch.autograd.grad(loss, t)
    assert grad.item() == 0.0
    # All terms are exp(0) = 1: log(1 + (4 N^2 - 2 N) / (4 N^2)).
    expected = math.log(1 + (4 * n * n - 2 * n) / (4 * n * n))
    assert loss.item() == pytest.approx(expected)


def test_dsa_loss_ties_and_large_unnormalised_values_are_finite() -> None:
    n = 4
    u = torch.zeros(n, 3, requires_grad=True)  # all embeddings tie
    v = torch.zeros(n, 3, requires_grad=True)
    m = torch.full((4, n, n), 1.0 / n, requires_grad=True)
    r = torch.randn(n, 5)
    loss = DSALoss(normalize=False)(
        out0=u, out1=v, aggregation=m, reference0=r, reference1=r, scores=torch.ones(n)
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert u.grad is not None and torch.isfinite(u.grad).all()
    # Far-apart unnormalised embeddings would overflow a naive exp.
    u = (torch.randn(n, 3) * 1e4).requires_grad_()
    v = (torch.randn(n, 3) * 1e4).requires_grad_()
    m = torch.full((4, n, n), 0.9)
    weighted = weighted_aggregation_loss(
        out0=u, out1=v, aggregation=m, scores=torch.ones(n), normalize=False
    )
    weighted.backward()
    assert u.grad is not None
    assert torch.isfinite(weighted) and torch.isfinite(u.grad).all()


def test_dsa_loss_trains_regulator_end_to_end() -> None:
    torch.manual_seed(0)
    regulator = DSARegulator(input_dim=8)
    u = torch.randn(10, 8, requires_grad=True)
    v = torch.randn(10, 8, requires_grad=True)
    r = torch.randn(10, 6)
    loss = DSALoss(k=3)(
        out0=u,
        out1=v,
        aggregation=regulator(u, v),
        reference0=r,
        reference1=r + 0.1,
        reference_origin=r,
    )
    loss.backward()
    assert all(p.grad is not None for p in regulator.parameters())


def test_dsa_loss_bad_inputs() -> None:
    u, v, m, r0, r1, s = _inputs(n=5, d=3, seed=4)
    criterion = DSALoss(k=20)
    kwargs = dict(out0=u, out1=v, aggregation=m, reference0=r0, reference1=r1)
    with pytest.raises(ValueError, match="exactly one"):
        criterion(**kwargs)
    with pytest.raises(ValueError, match="exactly one"):
        criterion(**kwargs, scores=s, reference_origin=r0)
    with pytest.raises(ValueError, match="k=20"):
        criterion(**kwargs, reference_origin=r0)
    with pytest.raises(ValueError, match="aggregation"):
        criterion(**{**kwargs, "aggregation": m[:2]}, scores=s)
    with pytest.raises(ValueError, match="out0 and out1"):
        criterion(**{**kwargs, "out1": v[:4]}, scores=s)
    with pytest.raises(ValueError, match="reference1"):
        criterion(**{**kwargs, "reference1": r1[:3]}, scores=s)
    with pytest.raises(ValueError, match="scores"):
        criterion(**kwargs, scores=s[:4])
    with pytest.raises(ValueError, match="temperature"):
        DSALoss(temperature=0.0)
    with pytest.raises(ValueError, match="weight_temperature"):
        DSALoss(weight_temperature=0.0)
    with pytest.raises(ValueError, match="lambda2"):
        DSALoss(lambda2=-1.0)
    with pytest.raises(ValueError, match="k must"):
        DSALoss(k=0)


def test_dsa_loss_gather_distributed_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="gather_distributed"):
        DSALoss(gather_distributed=True)
