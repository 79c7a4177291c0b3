"""Runs the CoTAP examples (PyTorch and Lightning) for one short epoch."""

from __future__ import annotations

import math
import runpy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from lightly_cotap.loss import (
    CoTAPObjective,
    CoTAPObjectiveComponents,
    PrototypeEntropyLoss,
)
from lightly_cotap.loss.cotap_objective import TERM_NAMES

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["pytorch/cotap.py", "pytorch_lightning/cotap.py"])
def test_cotap_example_runs(
    script: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LIGHTLY_COTAP_EXAMPLE_EPOCHS", "1")
    monkeypatch.chdir(tmp_path)  # Lightning writes lightning_logs/ here
    # Every value of the losses, to check what the example prints.
    steps: list[dict[str, float]] = []
    entropies: list[float] = []
    objective_forward = CoTAPObjective.forward_components
    entropy_forward = PrototypeEntropyLoss.forward

    def record_objective(
        self: CoTAPObjective, **kwargs: Any
    ) -> CoTAPObjectiveComponents:
        components = objective_forward(self, **kwargs)
        steps.append(
            {"total": float(components.total.detach())}
            | {k: float(v.detach()) for k, v in components.terms().items()}
        )
        return components

    def record_entropy(self: PrototypeEntropyLoss, **kwargs: Any) -> Tensor:
        value = entropy_forward(self, **kwargs)
        entropies.append(float(value.detach()))
        return value

    monkeypatch.setattr(CoTAPObjective, "forward_components", record_objective)
    monkeypatch.setattr(PrototypeEntropyLoss, "forward", record_entropy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    if script.startswith("pytorch/"):
        loss = float(out.split("epoch: 00, loss: ")[1].split()[0])
        # The printed loss is the mean over the steps of the objective plus the
        # prototype entropy, and every term is a finite value in its range.
        expected = (sum(step["total"] for step in steps) + sum(entropies)) / len(steps)
        assert loss == pytest.approx(expected, abs=2e-5)
        for step in steps:
            assert all(math.isfinite(v) for v in step.values()), step
            assert 0.0 <= step["cotap"] < 1.0  # a mean of u / (1 + u), u >= 0
            assert all(step[name] >= 0.0 for name in TERM_NAMES)  # cross-entropies
    else:
        assert (tmp_path / "lightning_logs").is_dir()
