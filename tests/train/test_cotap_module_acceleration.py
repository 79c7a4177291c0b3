"""The CoTAP step under bf16 autocast and under torch.compile."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from test_cotap_module import TINY, _batch
from torch import Tensor, nn
from torch._dynamo.backends.registry import lookup_backend

from lightly_cotap.cli import main
from lightly_cotap.models import cotap_vit
from lightly_cotap.train import CoTAPModule


def _step(
    module: CoTAPModule, batch: Any, seed: int, dtype: torch.dtype | None
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Loss, terms and student gradients of one step (same random draws per seed)."""
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        total, terms = module.compute_losses(batch)
    total.backward()
    grads = {
        name: p.grad.detach().clone()
        for name, p in module.student.named_parameters()
        if p.grad is not None
    }
    module.zero_grad(set_to_none=True)
    return total.detach(), {k: v.detach() for k, v in terms.items()}, grads


def _cosine(a: Tensor, b: Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_bf16_autocast_step_matches_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole step (forwards, all terms, backward) under bf16 autocast.

    The teacher's foreground mask thresholds the CLS attention; bf16 rounding
    flips a few patches of this random-init model (whose attention is almost
    flat), which changes the cells the patch terms compare: a discrete effect of
    the precision, checked loosely. With the masks of the float32 run replayed,
    the arithmetic of the step is checked tightly.
    """
    masks: list[Tensor] = []
    replay: list[Tensor] = []
    compute_mask = cotap_vit.foreground_mask_from_attention

    def recorded_mask(*args: Any, **kwargs: Any) -> Tensor:
        if replay:
            return replay.pop(0)
        mask: Tensor = compute_mask(*args, **kwargs)
        masks.append(mask)
        return mask

    torch.manual_seed(0)
    fp32 = CoTAPModule("vit_tiny_patch16_224", **TINY)
    bf16 = copy.deepcopy(fp32)
    own_masks = copy.deepcopy(fp32)
    batch = _batch(batch_size=2)
    monkeypatch.setattr(cotap_vit, "foreground_mask_from_attention", recorded_mask)
    # Steps 0 (bank fills), 1 (prototypes initialised) and 2 (all five terms).
    for step in range(3):
        total, terms, grads = _step(fp32, batch, seed=step, dtype=None)
        replay[:] = masks[-1:]
        total_16, terms_16, grads_16 = _step(
            bf16, batch, seed=step, dtype=torch.bfloat16
        )
        assert not replay
        assert total_16.dtype == torch.float32
        assert set(terms_16) == set(terms)
        for name, value in terms.items():
            assert float(terms_16[name]) == pytest.approx(float(value), rel=0.01)
        assert float(total_16) == pytest.approx(float(total), rel=0.01)
        assert set(grads_16) == set(grads)
        flat = torch.cat([g.flatten() for g in grads.values()])
        flat_16 = torch.cat([grads_16[name].flatten() for name in grads])
        assert _cosine(flat_16.float(), flat) > 0.99
        # With its own bf16 foreground masks.
        total_own, _, _ = _step(own_masks, batch, seed=step, dtype=torch.bfloat16)
        assert float(total_own) == pytest.approx(float(total), rel=0.1)
    assert "prototype_entropy" in terms


def _counting_backend(graphs: list[str], name: str = "aot_eager") -> Any:
    """A debugging backend of ``torch.compile`` that records the captured code.

    ``aot_eager`` captures the graphs and traces their backward with AOT autograd
    but generates no code (fast on a CPU); ``eager`` only captures.
    """
    run = lookup_backend(name)

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Any:
        graphs.append(gm.code)
        return run(gm, example_inputs)

    return backend


def test_compile_networks_gives_the_eager_step() -> None:
    torch.manual_seed(0)
    eager = CoTAPModule("vit_tiny_patch16_224", **TINY)
    compiled = copy.deepcopy(eager)
    graphs: list[str] = []
    torch._dynamo.reset()
    compiled.compile_networks(backend=_counting_backend(graphs))
    keys = set(compiled.state_dict())
    batch = _batch(batch_size=2)
    total, terms, grads = _step(eager, batch, seed=0, dtype=None)
    total_c, terms_c, grads_c = _step(compiled, batch, seed=0, dtype=None)
    # Student (global and local crops), teacher and objective were captured.
    assert len(graphs) >= 4
    assert set(compiled.state_dict()) == keys  # checkpoints unchanged
    for name, value in terms.items():
        torch.testing.assert_close(terms_c[name], value, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-3, atol=1e-5)


def test_train_command_compiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    graphs: list[str] = []
    compile_fn = torch.compile

    def compile_with_counting_backend(*args: Any, **kwargs: Any) -> Any:
        kwargs["backend"] = _counting_backend(graphs, "eager")
        return compile_fn(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_with_counting_backend)
    torch._dynamo.reset()
    out = tmp_path / "run"
    args = ["train", "--output-dir", str(out), "--num-threads", "1", "--compile"]
    args += ["--max-steps", "2", "--no-visualize", "--no-progress-bar"]
    assert main(args) == 0
    assert graphs
    assert (out / "backbone.pth").is_file()
