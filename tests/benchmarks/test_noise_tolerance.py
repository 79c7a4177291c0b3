from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "noise_tolerance.py"


@pytest.mark.slow
def test_quick_run_writes_results_table_and_plot(
    copy_paste_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    objects, backgrounds = copy_paste_inputs
    out = tmp_path / "report"
    criteria = ["continuous_ap", "mse", "infonce_fixed"]
    command = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--jobs",
        "1",
        "--objects",
        str(objects),
        "--backgrounds",
        str(backgrounds),
        "--criteria",
        *criteria,
        "--out",
        str(out),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=900)
    report = json.loads((out / "results.json").read_text())
    names = [s["name"] for s in report["settings"]]
    assert len(names) == 7
    assert {s["axis"] for s in report["settings"]} == {"noise", "imbalance"}
    assert report["seeds"] == [0]
    # {criterion: {setting: [per-seed linear-probe mIoU]}}
    for name in ("continuous_ap", "mse"):
        assert list(report[name]) == names
        for values in report[name].values():
            assert len(values) == 1 and 0.0 <= values[0] <= 1.0
    # The fixed-k InfoNCE runs where its k differs from the calibrated one only.
    assert sorted(report["infonce_fixed"]) == sorted(
        s["name"] for s in report["settings"] if s["share"] != "50%"
    )
    # The learning rate of the fixed variant comes from the sweep of the calibrated.
    assert set(report["lr_sweep"]) == {"continuous_ap", "mse", "infonce"}
    for name in criteria:
        sweep = report["lr_sweep"][name.removesuffix("_fixed")]
        assert report["lr"][name] == float(max(sweep, key=sweep.get))
    diagnostics = report["diagnostics"]["continuous_ap"]["noise=none, share=50%"]["0"]
    assert 0.0 <= diagnostics["misleading_init"] <= 1.0
    assert diagnostics["teacher"]["same"] > diagnostics["teacher"]["different"]
    table = (out / "table.md").read_text()
    assert "ContinuousAPLoss minus" in table
    assert "SimilarityMSELoss" in table
    assert (out / "noise_tolerance.png").read_bytes()[:4] == b"\x89PNG"
    # The report is rebuilt from results.json alone.
    (out / "table.md").unlink()
    (out / "noise_tolerance.png").unlink()
    subprocess.run(
        [sys.executable, str(SCRIPT), "--report-only", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (out / "table.md").read_text() == table
    assert (out / "noise_tolerance.png").exists()
    # A second run resumes from the finished tasks: same numbers, nothing retrained.
    (task,) = (out / "runs").iterdir()
    stamps = {f: f.stat().st_mtime_ns for f in task.iterdir()}
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    again = json.loads((out / "results.json").read_text())
    assert again["continuous_ap"] == report["continuous_ap"]
    assert again["kmeans"] == report["kmeans"]
    assert {f: f.stat().st_mtime_ns for f in task.iterdir()} == stamps
