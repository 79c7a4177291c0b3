from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightly_cotap.loss import value_checks
from lightly_cotap.loss.sinkhorn_codes import SinkhornCodes
from lightly_cotap.train.host_sync import forbid_host_sync


def _reference_sinkhorn(scores: Tensor, epsilon: float, iterations: int) -> Tensor:
    """Sinkhorn-Knopp written from the SwAV formula in float64: Q = exp(S / eps)^T
    (K x N), alternately scaled to uniform prototype (row) marginals 1/K and
    uniform sample (column) marginals 1/N; codes = N * Q^T (rows sum to 1).
    """
    q = torch.exp(scores.double() / epsilon).t()
    q = q / q.sum()
    k, n = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).t()


def test_codes_match_reference_without_queue() -> None:
    torch.manual_seed(0)
    scores = torch.randn(20, 8).tanh()
    codes_fn = SinkhornCodes(num_prototypes=8, queue_size=0, epsilon=0.05)
    codes = codes_fn(scores)
    expected = _reference_sinkhorn(scores, 0.05, 3)
    assert codes.dtype == torch.float32
    assert torch.allclose(codes.double(), expected, atol=1e-5)
    assert torch.allclose(codes.sum(dim=1), torch.ones(20), atol=1e-5)


def test_codes_use_the_queue_and_queue_is_fifo_of_masked_rows() -> None:
    torch.manual_seed(0)
    codes_fn = SinkhornCodes(
        num_prototypes=4, queue_size=6, queue_update_size=3, epsilon=0.1
    )
    first = torch.randn(5, 4).tanh()
    mask = torch.tensor([True, False, True, False, True])
    codes_first = codes_fn(first, enqueue_mask=mask)
    # Queue empty at the first call: codes of the batch alone.
    assert torch.allclose(
        codes_first.double(), _reference_sinkhorn(first, 0.1, 3), atol=1e-5
    )
    queue = codes_fn.queue
    assert queue.shape == (3, 4)
    # Exactly the masked rows entered (in some order).
    assert sorted(map(tuple, queue.tolist())) == sorted(
        map(tuple, first[mask].tolist())
    )
    second = torch.randn(7, 4).tanh()
    codes_second = codes_fn(second)  # no mask: any 3 rows enter
    expected = _reference_sinkhorn(torch.cat([queue, second]), 0.1, 3)[3:]
    assert torch.allclose(codes_second.double(), expected, atol=1e-5)
    assert int(codes_fn.num_filled) == 6
    third = torch.randn(4, 4).tanh()
    codes_fn(third, update=False)
    assert int(codes_fn.num_filled) == 6
    codes_fn(third)  # wraps around: the 3 oldest (first batch) are replaced
    rows = set(map(tuple, codes_fn.queue.tolist()))
    assert not rows & set(map(tuple, first.tolist()))
    assert len(rows & set(map(tuple, third.tolist()))) == 3


def test_mask_with_more_rows_than_update_size_queues_a_subset_of_them() -> None:
    torch.manual_seed(1)
    codes_fn = SinkhornCodes(
        num_prototypes=3, queue_size=10, queue_update_size=2, epsilon=0.1
    )
    batch = torch.randn(8, 3).tanh()
    mask = torch.tensor([True, False, True, True, False, False, True, False])
    codes_fn(batch, enqueue_mask=mask)
    queue = codes_fn.queue
    assert queue.shape == (2, 3)
    allowed = set(map(tuple, batch[mask].tolist()))
    assert set(map(tuple, queue.tolist())) <= allowed
    # The codes use the queue: they equal the reference over queue + batch.
    second = torch.randn(4, 3).tanh()
    expected = _reference_sinkhorn(torch.cat([queue, second]), 0.1, 3)[2:]
    assert torch.allclose(codes_fn(second).double(), expected, atol=1e-5)


def test_batch_reaching_the_end_fills_the_queue_and_restarts_at_zero() -> None:
    codes_fn = SinkhornCodes(
        num_prototypes=2, queue_size=5, queue_update_size=3, epsilon=0.1
    )
    first, second, third = (torch.full((3, 2), float(v)) for v in (1, 2, 3))
    codes_fn(first)
    codes_fn(second)  # 2 of 3 rows fit: the queue is full, the pointer restarts
    assert int(codes_fn.num_filled) == 5 and int(codes_fn.bank_ptr) == 0
    assert codes_fn.queue[:, 0].tolist() == [1, 1, 1, 2, 2]
    codes_fn(third)
    assert codes_fn.queue[:, 0].tolist() == [3, 3, 3, 2, 2]
    assert int(codes_fn.bank_ptr) == 3


def test_no_host_synchronisation() -> None:
    torch.manual_seed(2)
    codes_fn = SinkhornCodes(
        num_prototypes=4, queue_size=12, queue_update_size=5, epsilon=0.05
    )
    with forbid_host_sync():
        for _ in range(4):  # filling, full and wrapping around
            scores = torch.randn(7, 4)
            codes_fn(scores, enqueue_mask=scores[:, 0] > 0)
    assert int(codes_fn.num_filled) > 0


def test_large_scores_do_not_overflow() -> None:
    # exp((10 + s) / 0.05) overflows float32; the codes are invariant to a constant
    # shift of all scores, which the module uses.
    scores = torch.randn(10, 6).tanh()
    codes_fn = SinkhornCodes(num_prototypes=6, queue_size=0, epsilon=0.05)
    codes = codes_fn(scores + 10.0)
    assert torch.isfinite(codes).all()
    assert torch.allclose(codes, codes_fn(scores), atol=1e-5)


def test_codes_have_no_grad() -> None:
    scores = torch.randn(4, 3, requires_grad=True)
    codes = SinkhornCodes(num_prototypes=3, queue_size=0)(scores)
    assert not codes.requires_grad


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_prototypes=0), "num_prototypes"),
        (dict(num_prototypes=4, queue_size=-1), "queue_size"),
        (dict(num_prototypes=4, queue_update_size=-1), "queue_update_size"),
        (dict(num_prototypes=4, epsilon=0.0), "epsilon"),
        (dict(num_prototypes=4, iterations=0), "iterations"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SinkhornCodes(**kwargs)


def test_bad_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    codes_fn = SinkhornCodes(num_prototypes=4, queue_size=8)
    with pytest.raises(ValueError, match="scores"):
        codes_fn(torch.randn(3, 5))
    with pytest.raises(ValueError, match="enqueue_mask"):
        codes_fn(torch.randn(3, 4), enqueue_mask=torch.ones(2, dtype=torch.bool))
    bad = torch.randn(3, 4)
    bad[0, 0] = float("inf")
    with value_checks(), pytest.raises(ValueError, match="non-finite"):
        codes_fn(bad)
    codes_fn(bad)  # value checks are off by default
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="gather_distributed"):
        SinkhornCodes(num_prototypes=4, gather_distributed=True)
