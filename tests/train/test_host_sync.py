"""The training step runs ahead of the device: no host synchronisation in it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from test_cotap_module import TINY, _batch
from torch import Tensor
from torch.utils.data import DataLoader

from lightly_cotap.train import CoTAPModule
from lightly_cotap.train.host_sync import HostSyncError, forbid_host_sync

SYNCING: dict[str, Callable[[Tensor], Any]] = {
    "item": lambda x: x.sum().item(),
    "bool": lambda x: bool(x.sum() > 0),
    "if": lambda x: 1 if (x > 0).any() else 0,
    "float": lambda x: float(x.sum()),
    "int": lambda x: int(x.argmax()),
    "tolist": lambda x: x.tolist(),
    "mask_index": lambda x: x[x > 0],
    "mask_assign": lambda x: x.clone().index_put_((x > 0,), torch.tensor(1.0)),
    "nonzero": lambda x: torch.nonzero(x > 0),
    "where_one_argument": lambda x: torch.where(x > 0),
    "unique": lambda x: torch.unique(x.round()),
    "masked_select": lambda x: x.masked_select(x > 0),
    "slice_by_tensor": lambda x: x[: x.argmax()],
    "equal": lambda x: torch.equal(x, x),
}


@pytest.mark.parametrize("name", sorted(SYNCING))
def test_guard_rejects_synchronising_operations(name: str) -> None:
    x = torch.randn(8)
    SYNCING[name](x)  # fine outside the guard
    with pytest.raises(HostSyncError), forbid_host_sync():
        SYNCING[name](x)
    # The guard is lifted afterwards (Tensor.tolist restored, mode popped).
    SYNCING[name](x)


def test_guard_allows_asynchronous_work() -> None:
    x = torch.randn(8, requires_grad=True)
    with forbid_host_sync():
        mask = x > 0
        y = torch.where(mask, x, 0.0).sum() / mask.sum().clamp_min(1)
        y = y + x[torch.tensor([1, 2])].sum() + x.masked_fill(mask, 0.0).sum()
        y.backward()
        shape = int(x.shape[0])  # shapes are host values
    assert shape == 8 and x.grad is not None


class _GuardedModule(CoTAPModule):
    """Runs every training step and backward except the prototype
    initialisation step (k-means, once per run) inside :func:`forbid_host_sync`.
    """

    guarded_steps: list[int]
    logged_terms: list[set[str]]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        bank = self.prototype_bank
        assert bank is not None
        if bank.is_full and not self.backbone.prototypes_initialized:
            return super().training_step(batch, batch_idx)
        self.guarded_steps.append(self.global_step)
        with forbid_host_sync():
            loss = super().training_step(batch, batch_idx)
        self.logged_terms.append(
            {k for k in self.trainer.callback_metrics if k.startswith("train/")}
        )
        return loss

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        if self.global_step in self.guarded_steps:
            with forbid_host_sync():
                super().backward(loss, *args, **kwargs)
        else:
            super().backward(loss, *args, **kwargs)


def test_training_step_does_not_synchronise() -> None:
    torch.manual_seed(0)
    module = _GuardedModule("vit_tiny_patch16_224", **TINY)
    module.guarded_steps, module.logged_terms = [], []
    batch = _batch(batch_size=2)  # 8 bank samples per step: full after step 0
    trainer = pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader([batch] * 4, batch_size=None))  # type: ignore[arg-type]
    # Step 1 initialised the prototypes; steps 0, 2 and 3 ran under the guard,
    # before the bank was full and with the prototype entropy term.
    assert module.guarded_steps == [0, 2, 3]
    assert module.backbone.prototypes_initialized
    assert "train/loss_prototype_entropy" in module.logged_terms[-1]
    assert "train/loss_cotap" in module.logged_terms[0]
