from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "dense_quality.py"


@pytest.mark.slow
def test_quick_run_writes_every_row_and_diagnostic(
    copy_paste_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    objects, backgrounds = copy_paste_inputs
    out = tmp_path / "report"
    methods = ["b_cotap", "c_cotap_no_rank"]
    subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--jobs",
            "1",
            "--objects",
            str(objects),
            "--backgrounds",
            str(backgrounds),
            "--methods",
            *methods,
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    report = json.loads((out / "results.json").read_text())
    assert report["seeds"] == [0]
    runs = report["results"]["0"]
    assert set(runs) == {"R", "P", *methods}
    for run in runs.values():
        assert set(run["scores"]) == {
            "linear_probe",
            "kmeans",
            "retrieval",
            "objectness",
        }
        assert all(0.0 <= v <= 1.0 for v in run["scores"].values())
    # The ranking term is trained in (b) only; both report their other terms.
    assert "cotap" in runs["b_cotap"]["loss_terms"]
    assert "cotap" not in runs["c_cotap_no_rank"]["loss_terms"]
    assert "patch_cluster" in runs["c_cotap_no_rank"]["loss_terms"]
    assert all(math.isfinite(v) for v in runs["b_cotap"]["loss_terms"].values())
    agreement = runs["P"]["neighbors"]
    assert all(0.0 <= v <= 1.0 for v in agreement.values())
    foreground = runs["P"]["foreground_mask"]
    assert 0.0 < foreground["object_rate"] < 1.0
    table = (out / "table.md").read_text()
    for label in ("random initialisation", "P (stage 1", "(b) + CoTAP", "(c) + CoTAP"):
        assert label in table
    assert "(c) + CoTAP w/o ranking loss | " in table  # paired differences row
