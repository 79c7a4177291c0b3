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
    methods = ["a_dino", "b_cotap", "c_cotap_no_rank", "e_cotap_no_filter"]
    common = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--jobs",
        "1",
        "--objects",
        str(objects),
        "--backgrounds",
        str(backgrounds),
    ]
    subprocess.run(
        [*common, "--methods", *methods, "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    report = json.loads((out / "results.json").read_text())
    assert report["seeds"] == [0]
    assert report["stage1"].startswith("P (stage 1: supervised")
    runs = report["results"]["0"]
    # Per-row, per-seed values of every metric in percent, as in the table.
    for row in ("R", "P", *methods):
        for metric, values in report["rows"][row].items():
            assert values == [100 * runs[row]["scores"][metric]]
    gate = report["gate"]
    margin = report["rows"]["P"]["objectness"][0] - report["rows"]["R"]["objectness"][0]
    assert gate["margins"]["objectness"] == [pytest.approx(margin)]
    assert gate["passed"] == all(
        gate["mean_margins"][m] >= gate["required"][m] for m in gate["required"]
    )
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
    for label in ("random initialisation", "P (stage 1", "(b) + CoTAP", "(e) + CoTAP"):
        assert label in table
    assert "(c) + CoTAP w/o ranking loss | " in table  # paired differences row
    assert "Gate (P minus random initialisation" in table
    assert (out / "pca.png").is_file()

    # The stage-1 generalisation diagnostic reads the run's checkpoints.
    generalization = subprocess.run(
        [
            sys.executable,
            str(SCRIPT.parent / "stage1_generalization.py"),
            "--run",
            str(out),
            "--objects",
            str(objects),
            "--backgrounds",
            str(backgrounds),
            "--images",
            "30",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "| P seed0 |" in generalization.stdout

    # The saved stage-1 checkpoint starts a second run without stage-1 training.
    p_file = out / "stage1" / "seed0.pth"
    again = tmp_path / "again"
    subprocess.run(
        [
            *common,
            "--methods",
            "a_dino",
            "--stage1-checkpoint",
            str(p_file),
            "--out",
            str(again),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    second = json.loads((again / "results.json").read_text())
    assert second["stage1_checkpoint"] == str(p_file)
    assert second["rows"]["P"] == report["rows"]["P"]
    assert not (again / "stage1").exists()
