from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightly_cotap.models.modules.dsa_regulator import (
    DSA_BLOCKS,
    DSARegulator,
    good_neighbor_scores,
    knn_adjacency,
)


def _set_output_layer(
    regulator: DSARegulator, weight: float | None, bias: float
) -> None:
    layer = regulator.mlp[2]
    assert isinstance(layer, nn.Linear)
    if weight is not None:
        nn.init.constant_(layer.weight, weight)
    nn.init.constant_(layer.bias, bias)


def _reference_regulator(
    regulator: DSARegulator, out0: Tensor, out1: Tensor, cross: bool
) -> Tensor:
    """Loop version written from the description of the official code."""
    n = out0.shape[0]
    views = (out0, out1)
    blocks = []
    for a, b in DSA_BLOCKS:
        if not cross:
            b = a
        rows = []
        for i in range(n):
            for j in range(n):
                rows.append(views[a][i] - views[b][j])
        delta = torch.stack(rows)  # (N * N, D)
        delta = delta / delta.abs().sum(dim=0, keepdim=True)
        m = regulator.mlp(delta).view(n, n)
        m = m / m.sum(dim=1, keepdim=True)
        blocks.append(m)
    return torch.stack(blocks)


def _loop_good_neighbor_scores(neighbors: list[list[int]], k: int, mu: int) -> Tensor:
    """The official code's Python loops, applied to given neighbour lists."""
    n = len(neighbors)
    s = torch.zeros(n)
    for i in range(n):
        m = 0
        for j in neighbors[i]:
            s_ij = sum([1 if i in neighbors[nb] else 0 for nb in neighbors[j]])
            if s_ij > mu:
                m += 1
        s[i] = m / k
    return s


@pytest.mark.parametrize("cross", [True, False])
def test_regulator_matches_loop_reference(cross: bool) -> None:
    torch.manual_seed(0)
    regulator = DSARegulator(input_dim=6, hidden_dim=8, cross_view_differences=cross)
    regulator = regulator.double()
    # Positive output bias so that no row of the ReLU output is all zero.
    _set_output_layer(regulator, weight=None, bias=0.5)
    out0 = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    out1 = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    m = regulator(out0, out1)
    ref = _reference_regulator(regulator, out0, out1, cross)
    assert m.shape == (4, 5, 5)
    torch.testing.assert_close(m, ref)
    torch.testing.assert_close(m.sum(dim=2), torch.ones(4, 5, dtype=torch.float64))
    weights = torch.randn(4, 5, 5, dtype=torch.float64)
    grads = torch.autograd.grad((m * weights).sum(), [out0, out1])
    ref_grads = torch.autograd.grad((ref * weights).sum(), [out0, out1])
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


def test_regulator_code_faithful_cross_blocks_repeat_within_view() -> None:
    torch.manual_seed(1)
    out0, out1 = torch.randn(6, 4), torch.randn(6, 4)
    faithful = DSARegulator(input_dim=4, cross_view_differences=False)
    fixed = DSARegulator(input_dim=4)
    fixed.load_state_dict(faithful.state_dict())
    _set_output_layer(faithful, weight=None, bias=0.3)
    _set_output_layer(fixed, weight=None, bias=0.3)
    m_faithful = faithful(out0, out1)
    m_fixed = fixed(out0, out1)
    torch.testing.assert_close(m_faithful[2], m_faithful[0])
    torch.testing.assert_close(m_faithful[3], m_faithful[1])
    torch.testing.assert_close(m_fixed[:2], m_faithful[:2])
    assert not torch.allclose(m_fixed[2], m_fixed[0])


def test_regulator_all_zero_rows_stay_finite() -> None:
    regulator = DSARegulator(input_dim=3)
    _set_output_layer(regulator, weight=0.0, bias=-1.0)  # ReLU output is 0
    x = torch.zeros(4, 3)  # all differences are zero, too (tie)
    m = regulator(x, x)
    assert torch.equal(m, torch.zeros(4, 4, 4))


@pytest.mark.parametrize(
    "shape0, shape1",
    [((4, 3), (5, 3)), ((4, 3, 1), (4, 3, 1)), ((4, 5), (4, 5))],
)
def test_regulator_bad_shapes(shape0: tuple[int, ...], shape1: tuple[int, ...]) -> None:
    regulator = DSARegulator(input_dim=3)
    with pytest.raises(ValueError):
        regulator(torch.randn(shape0), torch.randn(shape1))


def test_regulator_bad_args() -> None:
    with pytest.raises(ValueError, match="input_dim"):
        DSARegulator(input_dim=0)
    with pytest.raises(ValueError, match="hidden_dim"):
        DSARegulator(input_dim=4, hidden_dim=0)


@pytest.mark.parametrize("mu", [0, 1, 2])
def test_good_neighbor_scores_match_loop(mu: int) -> None:
    torch.manual_seed(mu)
    n, k = 40, 6
    # Clustered features so that both good and bad neighbours occur.
    centers = torch.randn(4, 8) * 3
    features = centers[torch.randint(0, 4, (n,))] + torch.randn(n, 8)
    features[:3] = torch.randn(3, 8) * 10  # outliers
    adjacency = knn_adjacency(features, k=k)
    assert adjacency.sum(dim=1).eq(k).all()
    assert not adjacency.diagonal().any()
    neighbors = [torch.nonzero(row).flatten().tolist() for row in adjacency]
    expected = _loop_good_neighbor_scores(neighbors, k=k, mu=mu)
    scores = good_neighbor_scores(features, k=k, mu=mu)
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(
        good_neighbor_scores(adjacency=adjacency, k=k, mu=mu), expected
    )
    assert scores.min() >= 0 and scores.max() <= 1
    assert 0 < expected.sum() < n  # neither all-good nor all-bad: a real test


def test_knn_adjacency_matches_official_topk_without_self() -> None:
    torch.manual_seed(3)
    features = torch.randn(12, 5)
    z = torch.nn.functional.normalize(features, dim=1)
    indices = (z @ z.T).topk(4 + 1, dim=1).indices[:, 1:]  # official: drop self
    expected = torch.zeros(12, 12, dtype=torch.bool)
    expected.scatter_(1, indices, True)
    assert torch.equal(knn_adjacency(features, k=4), expected)


def test_good_neighbor_scores_bad_inputs() -> None:
    features = torch.randn(5, 3)
    with pytest.raises(ValueError, match="k must be"):
        good_neighbor_scores(features, k=5)
    with pytest.raises(ValueError, match="k must be"):
        good_neighbor_scores(features, k=0)
    with pytest.raises(ValueError, match="exactly one"):
        good_neighbor_scores(k=2)
    with pytest.raises(ValueError, match="features"):
        good_neighbor_scores(torch.randn(5), k=2)
    with pytest.raises(ValueError, match="mu"):
        good_neighbor_scores(features, k=2, mu=-1)
