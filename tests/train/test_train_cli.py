"""End-to-end test of ``lightly-cotap train`` on the embedded sample photos."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightly_cotap.cli import build_parser, main
from lightly_cotap.export import build_model_from_checkpoint, load_backbone
from lightly_cotap.models import CoTAPVisionTransformer
from lightly_cotap.train import CoTAPModule
from lightly_cotap.train.settings import DEMO_PRESET, PAPER_PRESET, resolve_settings

OBJECTIVE_TERMS = (
    "train/loss_cotap",
    "train/loss_patch_cluster",
    "train/loss_cross_crop_cls",
    "train/loss_cross_image_cls",
)


def _metrics(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_demo_run_end_to_end(tmp_path: Path) -> None:
    """One demo run (it takes most of the time), then every check on its outputs.

    Kept in one test so that pytest-xdist never runs the demo twice.
    """
    demo_run = tmp_path / "demo"
    # The no-argument demo (one CPU thread: robust when the tests share the CPU).
    assert main(["train", "--output-dir", str(demo_run), "--num-threads", "1"]) == 0
    _check_outputs(demo_run)
    _check_loss_decreases(demo_run)
    _check_exported_backbone(demo_run)
    _check_resume(demo_run, tmp_path)


def test_settings_presets() -> None:
    args = build_parser().parse_args(["train"])
    settings = resolve_settings(args)
    assert settings["preset"] == "demo"
    assert settings["backbone"] == DEMO_PRESET["backbone"]
    args = build_parser().parse_args(
        ["train", "--data", "somewhere", "--pool-sizes", "7", "14", "--batch-size", "8"]
    )
    settings = resolve_settings(args)
    assert settings["preset"] == "paper"
    assert settings["backbone"] == PAPER_PRESET["backbone"] == "vit_small_patch16_224"
    assert settings["pool_sizes"] == (7, 14) and settings["batch_size"] == 8
    assert settings["backbone_lr"] == 3e-5 and settings["head_lr"] == 3e-4


def _check_outputs(demo_run: Path) -> None:
    assert (demo_run / "checkpoints" / "last.ckpt").is_file()
    assert (demo_run / "backbone.pth").is_file()
    assert (demo_run / "neighbors.npz").is_file()
    png = Image.open(demo_run / "dense_features.png")
    size = DEMO_PRESET["visualize_size"]
    # 4 rows (images) x 3 columns (image, PCA before, PCA after) with padding.
    assert png.width > 3 * size and png.height > 4 * size


def _check_loss_decreases(demo_run: Path) -> None:
    rows = _metrics(next(demo_run.glob("logs/version_*/metrics.csv")))
    steps = [int(r["step"]) for r in rows if r["train/loss"]]
    assert max(steps) == DEMO_PRESET["max_steps"] - 1
    totals = [
        sum(float(r[name]) for name in OBJECTIVE_TERMS) for r in rows if r["train/loss"]
    ]
    first, last = totals[:10], totals[-10:]
    assert sum(last) / len(last) < sum(first) / len(first)
    # The prototypes were initialised and trained by the entropy loss.
    assert any(r.get("train/loss_prototype_entropy") for r in rows)


def _check_exported_backbone(demo_run: Path) -> None:
    module = CoTAPModule.load_from_checkpoint(
        demo_run / "checkpoints" / "last.ckpt", map_location="cpu"
    )
    student = module.backbone.eval()
    exported = load_backbone(demo_run / "backbone.pth")
    assert isinstance(exported, CoTAPVisionTransformer)
    assert exported.prototypes_initialized
    fresh = CoTAPVisionTransformer.from_checkpoint(demo_run / "backbone.pth")
    # The Lightning checkpoint itself, rebuilt from its hyper-parameters.
    from_lightning = build_model_from_checkpoint(
        demo_run / "checkpoints" / "last.ckpt", img_size=64
    )
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = student(images, return_fg_mask=True)
        for model in (exported, fresh, from_lightning):
            got = model(images, return_fg_mask=True)
            assert torch.equal(got.dense, want.dense)
            assert torch.equal(got.cls, want.cls)
            assert got.fg_mask is not None and want.fg_mask is not None
            assert torch.equal(got.fg_mask, want.fg_mask)
    # The student actually changed during training (not a copy of the init).
    init = CoTAPModule(
        DEMO_PRESET["backbone"], backbone_kwargs=dict(module.hparams["backbone_kwargs"])
    )
    assert not torch.equal(
        init.backbone.vit.blocks[0].attn.qkv.weight,
        student.vit.blocks[0].attn.qkv.weight,
    )


def _check_resume(demo_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    shutil.copytree(demo_run, out)
    steps = DEMO_PRESET["max_steps"] + 2
    main(
        [
            "train",
            "--output-dir",
            str(out),
            "--resume",
            str(out / "checkpoints" / "last.ckpt"),
            "--max-steps",
            str(steps),
            "--num-threads",
            "1",
            "--no-visualize",
            "--no-progress-bar",
        ]
    )
    checkpoint = torch.load(
        out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert checkpoint["global_step"] == steps
    logs = sorted(out.glob("logs/version_*/metrics.csv"))
    rows = _metrics(logs[-1])
    logged = sorted({int(r["step"]) for r in rows if r["train/loss"]})
    assert logged == list(range(DEMO_PRESET["max_steps"], steps))
