from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from lightly.loss import NTXentLoss
from torch import Tensor

from lightly_cotap.loss.class_aware_ntx_ent_loss import ClassAwareNTXentLoss


def _reference(out0: Tensor, out1: Tensor, labels: Tensor, tau: float) -> Tensor:
    """Per-anchor loop over the 2N candidates written from the formula."""
    n = out0.shape[0]
    z = torch.cat(
        [out0 / out0.norm(dim=1, keepdim=True), out1 / out1.norm(dim=1, keepdim=True)]
    )
    y = torch.cat([labels, labels])
    total = torch.zeros((), dtype=z.dtype)
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        terms = [
            torch.exp(z[a] @ z[k] / tau)
            for k in range(2 * n)
            if k != a and (k == pos or y[k] != y[a])
        ]
        total = total - torch.log(
            torch.exp(z[a] @ z[pos] / tau) / torch.stack(terms).sum()
        )
    return total / (2 * n)


@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_matches_reference(tau: float) -> None:
    g = torch.Generator().manual_seed(0)
    out0 = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    out1 = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    loss = ClassAwareNTXentLoss(temperature=tau)(out0, out1, labels=labels)
    expected = _reference(out0, out1, labels, tau)
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, [out0, out1])
    ref_grads = torch.autograd.grad(expected, [out0, out1])
    for gr, rg in zip(grads, ref_grads):
        torch.testing.assert_close(gr, rg)


def test_default_and_distinct_labels_equal_lightly_ntxent() -> None:
    torch.manual_seed(1)
    out0, out1 = torch.randn(6, 4), torch.randn(6, 4)
    expected = NTXentLoss(temperature=0.3)(out0, out1)
    criterion = ClassAwareNTXentLoss(temperature=0.3)
    torch.testing.assert_close(criterion(out0, out1), expected)
    torch.testing.assert_close(criterion(out0, out1, labels=torch.arange(6)), expected)
    # Masking removes terms from the denominator: the loss can only go down.
    masked = criterion(out0, out1, labels=torch.tensor([0, 0, 0, 1, 1, 1]))
    assert masked < expected


def test_single_class_leaves_only_the_positive() -> None:
    out0 = torch.randn(4, 3, requires_grad=True)
    out1 = torch.randn(4, 3)
    loss = ClassAwareNTXentLoss()(out0, out1, labels=torch.zeros(4, dtype=torch.long))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert out0.grad is not None and torch.isfinite(out0.grad).all()


def test_bad_inputs() -> None:
    out = torch.randn(4, 3)
    with pytest.raises(ValueError, match="labels must have shape"):
        ClassAwareNTXentLoss()(out, out, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="out0 and out1"):
        ClassAwareNTXentLoss()(out, out[:3], labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="memory bank"):
        ClassAwareNTXentLoss(memory_bank_size=(16, 3))(
            out, out, labels=torch.zeros(4, dtype=torch.long)
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _worker(rank: int, world_size: int, port: int, queue: mp.Queue) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    g = torch.Generator().manual_seed(0)
    out0 = torch.randn(8, 5, generator=g, dtype=torch.float64)
    out1 = torch.randn(8, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0])
    local = slice(4 * rank, 4 * rank + 4)
    x0 = out0[local].clone().requires_grad_()
    loss = ClassAwareNTXentLoss(gather_distributed=True)(
        x0, out1[local], labels=labels[local]
    )
    loss.backward()
    assert x0.grad is not None
    queue.put((rank, loss.item(), x0.grad.tolist()))
    torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_gather_distributed_equals_full_batch() -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    g = torch.Generator().manual_seed(0)
    out0 = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    out1 = torch.randn(8, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0])
    full = ClassAwareNTXentLoss()(out0, out1, labels=labels)
    # Each rank averages over its own anchors: the mean over ranks is the full loss.
    assert sum(r[1] for r in results) / 2 == pytest.approx(full.item())
    full.backward()
    assert out0.grad is not None
    # GatherLayer sums the gradients of all ranks: rank grads = d(sum of losses).
    grads = torch.tensor([row for r in results for row in r[2]], dtype=torch.float64)
    torch.testing.assert_close(grads, 2 * out0.grad)
