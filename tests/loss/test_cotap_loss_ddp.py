"""2-process CPU (gloo) checks of ``CoTAPLoss(gather_distributed=True)``.

Each rank draws with its own random state, and every image has fewer negatives than
there are other images, so which images are negatives depends on the draw: only the
permutation broadcast from rank 0 makes the ranks rank the same global list.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from lightly_cotap.loss import CoTAPLoss

WORLD_SIZE = 2
PER_RANK = 3  # images per rank: 6 in all, 5 other images per anchor
NUM_NEGATIVES = 2
SEED = 100  # rank r draws with seed SEED + r


def _batch() -> dict[str, Tensor]:
    """Inputs of the whole distributed batch (continuous masks: no ties)."""
    gen = torch.Generator().manual_seed(0)
    shape = (WORLD_SIZE * PER_RANK, 2, 4, 4, 5)  # (B, V, h, w, K)
    teacher_x = torch.randn(shape, generator=gen, dtype=torch.float64)
    teacher_pos = torch.randn(shape, generator=gen, dtype=torch.float64)
    return dict(
        student_x=teacher_x + 0.7 * torch.randn(shape, generator=gen).double(),
        student_pos=teacher_pos + 0.7 * torch.randn(shape, generator=gen).double(),
        teacher_x=teacher_x,
        teacher_pos=teacher_pos,
        fg_mask_x=torch.rand(shape[:4], generator=gen).double(),
        fg_mask_pos=torch.rand(shape[:4], generator=gen).double(),
    )


def _loss_and_grad(
    batch: dict[str, Tensor], seed: int, gather: bool
) -> tuple[Tensor, Tensor]:
    """Loss and the gradient of a per-channel student scale (a stand-in parameter)."""
    scale = torch.linspace(0.5, 1.5, 5, dtype=torch.float64).requires_grad_()
    inputs = dict(batch)
    for name in ("student_x", "student_pos"):
        inputs[name] = batch[name] * scale  # over the channel (last) dim
    loss_fn = CoTAPLoss(
        pool_sizes=(2, 4),
        top_k=2,
        num_negatives=NUM_NEGATIVES,
        random_tie_break=False,
        gather_distributed=gather,
    )
    torch.manual_seed(seed)
    loss = loss_fn(**inputs)
    loss.backward()
    assert scale.grad is not None
    return loss.detach(), scale.grad


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    result: dict[str, Any] = {}
    try:
        batch = _batch()
        local = {
            k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in batch.items()
        }
        loss, grad = _loss_and_grad(local, seed=SEED + rank, gather=True)
        dist.all_reduce(grad)  # what DDP does: average the gradients
        result.update(loss=loss, grad=grad / WORLD_SIZE)
        # Unequal batches: rank 1 holds one image less.
        uneven = {k: v[: PER_RANK - rank] for k, v in local.items()}
        try:
            _loss_and_grad(uneven, seed=SEED + rank, gather=True)
        except ValueError as ex:
            result["uneven_error"] = str(ex)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ranks_rank_one_global_list_drawn_on_rank_zero(tmp_path: Path) -> None:
    mp.spawn(
        _worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    single_loss, single_grad = _loss_and_grad(_batch(), seed=SEED, gather=False)
    # The draw matters: rank 1's own draw would give another loss.
    other_loss, _ = _loss_and_grad(_batch(), seed=SEED + 1, gather=False)
    assert not torch.allclose(other_loss, single_loss, rtol=1e-6)
    for r, result in enumerate(ranks):
        # Every rank ranks the list of the concatenated batch with rank 0's draw.
        torch.testing.assert_close(result["loss"], single_loss, rtol=1e-12, atol=0.0)
        torch.testing.assert_close(result["grad"], single_grad, rtol=1e-10, atol=1e-14)
        message = result.get("uneven_error", "")
        assert "same batch size on every rank" in message, r
        assert "batch sizes [3, 2]" in message and "student_x" in message
