from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "device_check.py"
SECTIONS = ["sync", "loss", "step", "filter", "mmseg", "compile"]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _smoke_run(tmp_path: Path, sections: list[str]) -> tuple[dict[str, Any], str]:
    out = tmp_path / "check.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)]
        + ["--sections", *sections],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report: dict[str, Any] = json.loads(out.read_text())
    return report, run.stdout


def test_cpu_smoke_run_measures_every_section(tmp_path: Path) -> None:
    report, stdout = _smoke_run(tmp_path, SECTIONS[:-1])
    sections = report["sections"]
    assert report["mode"] == "cpu-smoke"
    for name in ("sync", "loss", "step", "filter"):
        assert sections[name]["status"].startswith("ok"), (name, sections[name])
    assert sections["sync"]["training_step"] == "no host synchronisation"
    rows = sections["loss"]["rows"]
    assert [row["n"] for row in rows] == [64, 128, 256, 512, 1024]
    for row in rows:
        assert row["fast_s"] > 0 and row["dense_s"] > 0 and row["auto_s"] > 0
        assert row["auto_path"] == ("dense" if row["n"] <= 512 else "fast")
    assert sections["step"]["batch_pairs"] == 4  # the CPU search stops at 4
    assert sections["step"]["ratio_cotap_to_dino"] > 0
    assert sections["filter"]["time_ratio"] > 0
    mmseg = sections["mmseg"]["status"]
    assert mmseg == "ok" or mmseg.startswith("skipped: mmseg not installed")
    if mmseg == "ok":
        assert sections["mmseg"]["iterations_per_s"] > 0
    # One table on stdout, a row per measure.
    assert "| section | measure | value | status |" in stdout
    assert "| loss | n=1024 |" in stdout
    assert "| compile | - | - | not run (0 s) |" in stdout


@pytest.mark.slow
def test_cpu_smoke_compile_section(tmp_path: Path) -> None:
    """Graph capture only: the smoke run compiles with the eager backend
    (inductor takes minutes on a CPU).
    """
    report, _ = _smoke_run(tmp_path, ["compile"])
    compiled = report["sections"]["compile"]
    assert compiled["status"] == "ok", compiled
    assert compiled["backend"] == "eager" and compiled["graph_breaks"] == 0
    assert compiled["images_per_s"]["compiled"] > 0


def test_failing_or_overrunning_section_is_reported_and_the_run_goes_on() -> None:
    check = _load()
    budget = check.Budget(60)

    def broken() -> dict[str, Any]:
        raise ValueError("boom")

    assert check.run_section("a", broken, budget, 0)["status"] == (
        "failed: ValueError: boom"
    )
    assert check.run_section("b", lambda: {"x": 1}, budget, 0)["status"] == "ok"
    assert check.run_section("c", lambda: {}, budget, 120)["status"].startswith(
        "skipped: time budget"
    )

    def slow() -> dict[str, Any]:
        time.sleep(10)
        return {}

    start = time.monotonic()
    result = check.run_section("d", slow, check.Budget(1), 0)
    assert result["status"].startswith("failed: SectionTimeout")
    assert time.monotonic() - start < 5
    report = {"sections": {"a": {"status": "failed: ValueError: boom"}}}
    text = check.table(report)
    assert "| a |" not in text  # only the known sections, in order
    assert all(f"| {name} |" in text for name in SECTIONS)


@pytest.mark.parametrize("section", SECTIONS)
def test_every_section_is_in_the_table(section: str) -> None:
    check = _load()
    text = check.table({"sections": {section: {"status": "ok", "seconds": 1.0}}})
    assert f"| {section} | - | - | ok (1.0 s) |" in text
