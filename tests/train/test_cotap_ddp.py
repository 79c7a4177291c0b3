"""2-process CPU (gloo) checks of the distributed CoTAP objective and example.

The terms that use other images of the batch (CoTAP ranking list and negatives,
Sinkhorn codes, patch-cluster normalisation) are computed with
``gather_distributed=True`` on two processes that each hold half of a batch; the
mean of the per-process losses and the DDP-averaged gradients must equal those of
one process on the whole batch.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DISTRIBUTED_EXAMPLE = EXAMPLES / "pytorch_lightning_distributed" / "cotap.py"
WORLD_SIZE = 2
BATCH = 4  # pairs in total, 2 per process
TERMS = ("cotap", "patch_cluster", "cross_crop_cls", "cross_image_cls")


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "cotap_ddp_example", DISTRIBUTED_EXAMPLE
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _make_batch(path: Path) -> None:
    from lightly_cotap.data import (
        NeighborIndex,
        SampleImageDataset,
        SemanticPairDataset,
    )
    from lightly_cotap.transforms import CoTAPTransform

    torch.manual_seed(0)
    base = SampleImageDataset()
    index = NeighborIndex([[(i + 1) % len(base)] for i in range(len(base))])
    pairs = SemanticPairDataset(
        base,
        neighbors=index,
        transform=CoTAPTransform(
            global_crop_size=32, local_crop_size=16, n_local_views=2
        ),
    )
    torch.save(next(iter(DataLoader(pairs, batch_size=BATCH))), path)


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, dict):
        return {k: _slice(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice(v, start, stop) for v in batch)
    return batch


def _losses_and_grads(batch: Any, gather: bool) -> dict[str, Any]:
    """Builds the example model (same seed everywhere) and runs one loss + backward."""
    from lightly_cotap.loss import CoTAPObjective

    torch.manual_seed(0)
    example = _load_example()
    model = example.CoTAP(max_steps=10, gather_distributed=gather)
    # Deterministic pair list: every other image is a negative (R = B_total - 1)
    # and ties in the foreground score are broken by index.
    model.criterion = CoTAPObjective(
        patch_prototypes=512,
        cls_prototypes=1024,
        pool_sizes=(1, 2),
        top_k=2,
        num_negatives=BATCH - 1,
        random_tie_break=False,
        roi_output_size=1,
        patch_queue_size=256,
        cls_queue_size=16,
        gather_distributed=gather,
    )
    loss, terms = model.compute_loss(batch)
    loss.backward()
    grads = {
        name: p.grad.detach().clone()
        for name, p in model.named_parameters()
        if p.grad is not None and name.startswith("student")
    }
    return {
        "terms": {k: float(v) for k, v in terms.items()},
        "loss": float(loss),
        "grads": grads,
    }


def _worker(rank: int, batch_path: str, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        batch = torch.load(batch_path, weights_only=False)
        per_rank = BATCH // WORLD_SIZE
        local = _slice(batch, rank * per_rank, (rank + 1) * per_rank)
        result = _losses_and_grads(local, gather=True)
        for grad in result["grads"].values():  # what DDP does: average the gradients
            dist.all_reduce(grad)
            grad /= WORLD_SIZE
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.ddp
def test_gathered_losses_match_single_process_on_concatenated_batch(
    tmp_path: Path,
) -> None:
    torch.set_num_threads(1)
    batch_path = tmp_path / "batch.pt"
    _make_batch(batch_path)
    mp.spawn(
        _worker,
        args=(str(batch_path), str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = _losses_and_grads(torch.load(batch_path, weights_only=False), gather=False)
    for term in TERMS:
        distributed = sum(r["terms"][term] for r in ranks) / WORLD_SIZE
        assert distributed == pytest.approx(single["terms"][term], rel=1e-4), term
    # Without gathering the two halves would give other values for the terms that
    # use other images (sanity check that the comparison can fail).
    batch = torch.load(batch_path, weights_only=False)
    halves = [
        _losses_and_grads(_slice(batch, 2 * r, 2 * r + 2), gather=False)
        for r in range(2)
    ]
    assert sum(h["terms"]["cotap"] for h in halves) / 2 != pytest.approx(
        single["terms"]["cotap"], rel=1e-4
    )
    # DDP-averaged gradients of the total loss equal the single-process gradients.
    assert set(ranks[0]["grads"]) == set(single["grads"])
    for name, grad in single["grads"].items():
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
@pytest.mark.ddp
def test_distributed_example_runs_on_two_cpu_processes(tmp_path: Path) -> None:
    env = dict(
        os.environ,
        LIGHTLY_COTAP_EXAMPLE_EPOCHS="1",
        LIGHTLY_COTAP_EXAMPLE_DEVICES="2",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    result = subprocess.run(
        [sys.executable, str(DISTRIBUTED_EXAMPLE)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_epochs=1" in result.stderr + result.stdout
    assert (tmp_path / "lightning_logs").is_dir()
