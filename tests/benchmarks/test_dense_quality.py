from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "dense_quality.py"


def _quick_command(inputs: tuple[Path, Path]) -> list[str]:
    """The benchmark's smoke run on the fixture's cut-outs and backgrounds."""
    objects, backgrounds = inputs
    return [sys.executable, str(SCRIPT), "--quick", "--jobs", "1"] + [
        "--objects",
        str(objects),
        "--backgrounds",
        str(backgrounds),
    ]


@pytest.mark.slow
def test_quick_run_writes_every_row_and_diagnostic(
    copy_paste_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    objects, backgrounds = copy_paste_inputs
    out = tmp_path / "report"
    methods = ["a_dino", "b_cotap", "c_cotap_no_rank", "e_cotap_no_filter"]
    common = _quick_command(copy_paste_inputs)
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
    assert f"stage 1 loaded from {p_file}," in (again / "table.md").read_text()
    assert not (again / "stage1").exists()


def _object_pool(objects: Path, root: Path) -> Path:
    """Two classes (not the evaluation's three) of the fixture's cut-outs."""
    files = sorted(objects.rglob("*.png"))
    for i, path in enumerate(files):
        target = root / f"group{i % 2}" / f"{path.parent.name}_{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return root


def test_stage1_images_come_from_the_object_pool(
    copy_paste_inputs: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from dense_quality_config import Config, Paths
    from dense_quality_data import object_centric_images, object_centric_scenes

    objects, backgrounds = copy_paste_inputs
    pool = _object_pool(objects, tmp_path / "pool")
    cfg = Config(stage1_images=40)
    images, labels = object_centric_images(
        Paths(objects, backgrounds, pool), cfg, seed=0, size=32
    )
    assert len(images) == 40 and images[0].size == (32, 32)
    assert set(labels) == {0, 1}  # the pool's classes
    scenes = object_centric_scenes(
        pool,
        backgrounds,
        split="train",
        object_split="all",
        num_samples=40,
        image_size=32,
        seed=3000,
    )
    # Every pool cut-out is used, on the train-split backgrounds only.
    assert sum(len(v) for v in scenes.objects.values()) == 9
    train = object_centric_scenes(
        objects, backgrounds, split="train", num_samples=1, image_size=32, seed=0
    )
    assert scenes.backgrounds == train.backgrounds
    _, eval_labels = object_centric_images(
        Paths(objects, backgrounds), cfg, seed=0, size=32
    )
    assert set(eval_labels) == {0, 1, 2}


@pytest.mark.slow
def test_quick_stage1_only_run_on_an_object_pool(
    copy_paste_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    pool = _object_pool(copy_paste_inputs[0], tmp_path / "pool")
    common = [*_quick_command(copy_paste_inputs), "--stage1-only"]
    common += ["--stage1-images", "32"]
    reports = {}
    for name, extra in (("pool", ["--stage1-objects", str(pool)]), ("split", [])):
        out = tmp_path / name
        subprocess.run(
            [*common, *extra, "--out", str(out)],
            check=True,
            capture_output=True,
            timeout=600,
        )
        reports[name] = json.loads((out / "results.json").read_text())
        assert set(reports[name]["rows"]) == {"R", "P"}
        assert (out / "stage1" / "seed0.pth").is_file()
        assert not (out / "models").exists() and not (out / "pca.png").exists()
        assert "Gate (P minus random" in (out / "table.md").read_text()
    report = reports["pool"]
    assert report["stage1_objects"] == str(pool)
    assert reports["split"]["stage1_objects"] is None
    assert report["config"]["stage1_images"] == 32
    assert report["stage1"].startswith("P (stage 1: supervised stamp class of the")
    # Same evaluation, different stage-1 data.
    assert report["rows"]["R"] == reports["split"]["rows"]["R"]
    pool_p = torch.load(tmp_path / "pool/stage1/seed0.pth", weights_only=True)
    split_p = torch.load(tmp_path / "split/stage1/seed0.pth", weights_only=True)
    assert any(
        not torch.equal(pool_p["state_dict"][k], split_p["state_dict"][k])
        for k in pool_p["state_dict"]
    )
    missing = subprocess.run(
        [*common, "--stage1-objects", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "--stage1-objects" in missing.stderr
