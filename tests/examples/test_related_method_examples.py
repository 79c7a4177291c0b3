"""Runs the DSA / CO-SSL / BagSSL / semantic-pair examples for one epoch (smoke test)."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    "script",
    [
        "pytorch/dsa.py",
        "pytorch/cossl.py",
        "pytorch/bagssl.py",
        "pytorch/semantic_pairs.py",
        "pytorch_lightning/cossl.py",
    ],
)
def test_example_runs(
    script: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LIGHTLY_COTAP_EXAMPLE_EPOCHS", "1")
    monkeypatch.chdir(tmp_path)  # Lightning writes lightning_logs/ here
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    out = capsys.readouterr().out
    if script.startswith("pytorch/"):
        assert "epoch: 00, loss: " in out
        loss = float(out.split("epoch: 00, loss: ")[1].split()[0])
        assert math.isfinite(loss)  # neither NaN nor inf
    else:
        assert (tmp_path / "lightning_logs").is_dir()
