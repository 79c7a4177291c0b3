from __future__ import annotations

import pytest
import torch

from lightly_cotap.models.modules import PrototypeBank
from lightly_cotap.train.host_sync import forbid_host_sync


def test_fills_with_all_samples_then_fifo_subsets() -> None:
    torch.manual_seed(0)
    bank = PrototypeBank(num_samples=10, dim=3, num_update_when_full=2)
    assert not bank.is_full
    assert bank.samples.shape == (0, 3)
    first = torch.arange(12, dtype=torch.float).reshape(4, 3)
    bank.update(first)
    assert int(bank.num_seen) == 4
    torch.testing.assert_close(bank.samples, first)
    second = 100 + torch.arange(18, dtype=torch.float).reshape(6, 3)
    bank.update(second)
    assert bank.is_full
    torch.testing.assert_close(bank.samples, torch.cat([first, second]))

    # Once full, only num_update_when_full samples of a batch replace the oldest.
    third = -1 - torch.arange(15, dtype=torch.float).reshape(5, 3)
    bank.update(third)
    samples = bank.samples
    assert samples.shape == (10, 3)
    new_rows = [row for row in samples if bool((row < 0).all())]
    assert len(new_rows) == 2
    assert all(any(torch.equal(r, t) for t in third) for r in new_rows)
    # The two oldest samples were replaced.
    torch.testing.assert_close(samples[2:], torch.cat([first, second])[2:])


def test_none_adds_everything() -> None:
    bank = PrototypeBank(num_samples=4, dim=2, num_update_when_full=None)
    bank.update(torch.zeros(4, 2))
    bank.update(torch.ones(3, 2))
    assert int((bank.samples == 1).all(dim=1).sum()) == 3


def test_batch_larger_than_bank() -> None:
    bank = PrototypeBank(num_samples=4, dim=2)
    bank.update(torch.randn(7, 2))
    assert bank.is_full
    assert bank.samples.shape == (4, 2)


def test_empty_update_is_noop_and_no_grad() -> None:
    bank = PrototypeBank(num_samples=4, dim=2)
    bank.update(torch.zeros(0, 2))
    assert int(bank.num_seen) == 0
    x = torch.randn(2, 2, requires_grad=True)
    bank.update(x)
    assert not bank.samples.requires_grad


def test_no_host_synchronisation() -> None:
    bank = PrototypeBank(num_samples=6, dim=2, num_update_when_full=3)
    with forbid_host_sync():
        for _ in range(4):  # filling, full, replacing
            bank.update(torch.randn(4, 2))
            samples = bank.samples
        full = bank.is_full
    assert full and samples.shape == (6, 2)
    # 4 + 2 (full, restart at 0) + 3 + 3 (restart at 0): the FIFO of Lightly.
    assert int(bank.num_seen) == 12 and int(bank.bank_ptr) == 0


def test_invalid() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        PrototypeBank(num_samples=0, dim=2)
    with pytest.raises(ValueError, match="dim"):
        PrototypeBank(num_samples=2, dim=0)
    with pytest.raises(ValueError, match="num_update_when_full"):
        PrototypeBank(num_samples=2, dim=2, num_update_when_full=0)
    bank = PrototypeBank(num_samples=4, dim=2)
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        bank.update(torch.randn(3, 5))
