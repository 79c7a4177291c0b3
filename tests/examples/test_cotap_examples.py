"""Runs the CoTAP examples (PyTorch and Lightning) for one short epoch."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    if script.startswith("pytorch/"):
        loss = float(out.split("epoch: 00, loss: ")[1].split()[0])
        assert loss == loss and loss > 0  # finite, not NaN
    else:
        assert (tmp_path / "lightning_logs").is_dir()
