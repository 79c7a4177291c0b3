"""``lightly-cotap mmseg-config``: export + image / mask folders -> mmseg config."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("mmseg")

from mmengine.config import Config  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402

import lightly_cotap.mmseg  # noqa: E402,F401
from lightly_cotap.cli import main  # noqa: E402
from lightly_cotap.export import export_backbone  # noqa: E402
from lightly_cotap.mmseg.runner import (  # noqa: E402
    IRRELEVANT_LOG_MESSAGES,
    IRRELEVANT_WARNINGS,
)
from lightly_cotap.mmseg_config import level_indices  # noqa: E402
from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer  # noqa: E402

TRAINED = 32  # image size of the export's position embedding
#: The train demo's architecture at a quarter of its width: patch 8, depth 4.
STRUCTURE: dict[str, Any] = dict(patch_size=8, embed_dim=48, depth=4, num_heads=3)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = CoTAPVisionTransformer(
        "vit_tiny_patch16_224", img_size=TRAINED, num_prototypes=6, **STRUCTURE
    )
    assert model.filter is not None
    model.filter.set_prototypes(torch.randn_like(model.filter.prototypes))
    path = tmp_path_factory.mktemp("export") / "backbone.pth"
    export_backbone(model, path)
    return path


def _write_config(data: Path, checkpoint: Path, output: Path, *extra: str) -> Config:
    args = ["mmseg-config", "--data", str(data), "--checkpoint", str(checkpoint)]
    assert main([*args, "--output", str(output), "--device", "cpu", *extra]) == 0
    return Config.fromfile(str(output))


def _user_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(["mmseg-config", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lightly-cotap mmseg-config: error: ")
    return err[len("lightly-cotap mmseg-config: error: ") :].strip()


@pytest.mark.parametrize("head", ["linear", "fcn", "upernet"])
def test_config_fits_export_data_machine_and_schedule(
    head: str,
    export: Path,
    brightness_segmentation: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = _write_config(
        brightness_segmentation,
        export,
        tmp_path / "seg.py",
        "--head",
        head,
        "--iters",
        "300",
        "--crop",
        "64",
    )
    err = capsys.readouterr().err
    assert (
        "No classes.json in --data: 3 classes from the mask values 0-2 (255 = "
        "ignored), named by their ids;"
    ) in err
    assert f"Wrote {tmp_path / 'seg.py'}. Train (mIoU on masks/val" in err
    # inherits the shipped pieces
    text = (tmp_path / "seg.py").read_text()
    assert f"mmseg_configs/_base_/models/{head}_cotap-vit-s16.py" in text
    assert (
        "position embedding trained at 32x32 px, resampled by CoTAPViT for the "
        "64x64 crop"
    ) in text
    assert cfg.runner_type == "QuietRunner"
    # the export's architecture, widths and prototypes
    backbone = cfg.model.backbone
    assert backbone.arch == "vit_tiny_patch16_224"
    assert backbone.timm_kwargs == dict(patch_size=8, embed_dim=48, depth=4)
    assert (backbone.use_filter, backbone.num_prototypes) == (True, 6)
    assert backbone.init_cfg.checkpoint == str(export.resolve())
    expected_levels = {"linear": (3,), "fcn": (2, 3), "upernet": (0, 1, 2, 3)}
    assert tuple(backbone.out_indices) == expected_levels[head]
    decode = cfg.model.decode_head
    if head == "upernet":
        assert cfg.model.neck.in_channels == [48, 48, 48, 96]
        assert decode.in_channels == [48] * 4
    else:
        assert decode.in_channels == 96  # 2 x 48 with the filter
    if head != "linear":
        assert cfg.model.auxiliary_head.in_channels == 48
        assert cfg.model.auxiliary_head.num_classes == 3
    # the data: classes, and the crop everywhere it is needed
    assert decode.num_classes == 3
    assert cfg.train_dataloader.dataset.metainfo.classes == ("0", "1", "2")
    assert cfg.val_dataloader.dataset.data_prefix.seg_map_path == "masks/val"
    assert tuple(cfg.model.data_preprocessor.size) == (64, 64)
    assert tuple(backbone.img_size) == (64, 64)
    assert tuple(cfg.model.test_cfg.crop_size) == (64, 64)
    crop = [t for t in cfg.train_dataloader.dataset.pipeline if t.type == "RandomCrop"]
    assert tuple(crop[0].crop_size) == (64, 64)
    # the machine (CPU) and the schedule (--iters everywhere)
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.env_cfg.dist_cfg.backend == "gloo"
    assert cfg.train_cfg.max_iters == 300
    assert cfg.train_cfg.val_interval == cfg.default_hooks.checkpoint.interval == 30
    if head == "linear":
        assert "end" not in cfg.param_scheduler[-1]  # mmengine ends it at 300
    else:
        warmup, poly = cfg.param_scheduler
        assert warmup.end == poly.begin == 30 and "end" not in poly
        assert cfg.warmup_iters == 30
    # the checkpoint fits the written backbone (strict, architecture checked)
    built = MODELS.build(cfg.model.backbone)
    built.init_weights()
    assert built.out_channels[-1] == 96


def test_classes_json_names_the_classes(
    export: Path, brightness_segmentation: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(brightness_segmentation, data)
    (data / "classes.json").write_text(
        json.dumps({"class_names": ["dark", "medium", "bright"]})
    )
    cfg = _write_config(data, export, tmp_path / "seg.py", "--crop", "64")
    assert cfg.train_dataloader.dataset.metainfo.classes == ("dark", "medium", "bright")
    assert cfg.train_cfg.max_iters == 20000  # the linear default
    # GPU machine: the shipped per-GPU batch size
    cfg = _write_config(
        data, export, tmp_path / "gpu.py", "--head", "fcn", "--device", "gpu"
    )
    assert cfg.train_dataloader.batch_size == 4
    assert cfg.env_cfg.dist_cfg.backend == "nccl"  # the shipped runtime
    assert tuple(cfg.crop_size) == (512, 512)


def _broken_data(root: Path, tmp_path: Path, case: str) -> Path:
    data = tmp_path / case
    shutil.copytree(root, data)
    if case == "no_val_masks":
        shutil.rmtree(data / "masks" / "val")
    elif case == "image_without_mask":
        (data / "masks" / "train" / "rocket.png").unlink()
    elif case == "mixed_suffixes":
        image = Image.open(data / "images" / "train" / "rocket.jpg")
        image.save(data / "images" / "train" / "rocket.png")
        (data / "images" / "train" / "rocket.jpg").unlink()
    elif case == "rgb_mask":
        mask = Image.open(data / "masks" / "val" / "hubble_deep_field.png")
        mask.convert("RGB").save(data / "masks" / "val" / "hubble_deep_field.png")
    elif case == "too_few_names":
        (data / "classes.json").write_text(json.dumps(["dark", "bright"]))
    elif case == "bad_json":
        (data / "classes.json").write_text("{not json")
    elif case == "stray_value":
        mask_path = data / "masks" / "val" / "hubble_deep_field.png"
        labels = np.asarray(Image.open(mask_path)).copy()
        labels[0, 0] = 200  # one stray pixel must not make 201 classes
        Image.fromarray(labels).save(mask_path)
    elif case == "wrong_size":
        mask_path = data / "masks" / "train" / "rocket.png"
        mask = Image.open(mask_path)
        mask.resize((mask.width // 2, mask.height)).save(mask_path)
    elif case in ("only_ignore", "one_class"):
        for mask_path in (data / "masks").rglob("*.png"):
            labels = np.asarray(Image.open(mask_path))
            value = 255 if case == "only_ignore" else 0
            Image.fromarray(np.full_like(labels, value)).save(mask_path)
    return data


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "no_val_masks",
            r"^--data '.*' needs images/val and masks/val with one mask "
            r"per image: masks folder '.*/masks/val' does not exist\.$",
        ),
        (
            "image_without_mask",
            r"^--data '.*' needs images/train and masks/train with "
            r"one mask per image: 1 images in '.*' have no mask in '.*'",
        ),
        (
            "mixed_suffixes",
            r"^the images of --data have the suffixes \['\.jpg', "
            r"'\.png'\]; mmseg reads one suffix per folder: convert them to one format\.$",
        ),
        (
            "rgb_mask",
            r"^--data: '.*hubble_deep_field\.png': is a RGB image; masks must be "
            r"single-channel images of class ids \(or palette PNGs\)$",
        ),
        (
            "too_few_names",
            r"^--data: '.*\.png': labels \[2\] \(\d+ pixels\) lie outside the 2 "
            r"classes declared by .*classes\.json \(labels 0\.\.1, 255 = ignore\); "
            r"fix the masks or declare the right classes with a classes\.json in "
            r"--data$",
        ),
        ("bad_json", r"^'.*classes\.json' is not valid JSON: "),
        (
            "only_ignore",
            r"^every mask pixel of --data is 255 \(ignored\): no classes\.$",
        ),
        (
            "one_class",
            r"^--data: '.*\.png': every labelled pixel is class \[0\] \(the rest "
            r"equals the ignore value 255\); segmentation needs at least two "
            r"labelled classes$",
        ),
        (
            "stray_value",
            r"^--data: '.*hubble_deep_field\.png': holds label 200 \(1 pixels\) but "
            r"the masks' labels \[0, 1, 2, 200\] are not 0\.\.N \(197 values in "
            r"between never occur\); declare the classes with a classes\.json in "
            r"--data instead of letting a stray value define them$",
        ),
        (
            "wrong_size",
            r"^--data: '.*/masks/train': 1 masks differ in size from their images "
            r"\(width x height\): rocket\.png is \d+x\d+, rocket\.jpg is \d+x\d+; ",
        ),
    ],
)
def test_data_errors(
    case: str,
    message: str,
    export: Path,
    brightness_segmentation: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = _broken_data(brightness_segmentation, tmp_path, case)
    args = ["--data", str(data), "--checkpoint", str(export), "--crop", "64"]
    error = _user_error(capsys, *args, "--output", str(tmp_path / "seg.py"))
    assert re.search(message, error, re.S), error
    assert not (tmp_path / "seg.py").exists()


def test_option_errors(
    export: Path,
    brightness_segmentation: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["--data", str(brightness_segmentation), "--checkpoint", str(export)]
    out = ["--output", str(tmp_path / "seg.py")]
    assert _user_error(capsys, *base, *out, "--crop", "60") == (
        "--crop must be a positive multiple of the patch size 8 of the checkpoint, "
        "got 60."
    )
    assert _user_error(capsys, *base, *out, "--iters", "0") == (
        "--iters must be positive, got 0."
    )
    assert _user_error(capsys, *base, "--output", str(tmp_path / "seg.txt")) == (
        f"--output must be a .py file, got '{tmp_path / 'seg.txt'}'."
    )
    missing = tmp_path / "missing.pth"
    args = ["--data", str(brightness_segmentation), "--checkpoint", str(missing)]
    assert _user_error(capsys, *args, *out) == (
        f"--checkpoint '{missing}' is not a file."
    )
    assert _user_error(capsys, *base, *out, "--batch-size", "0") == (
        "--batch-size must be positive, got 0."
    )
    text_file = tmp_path / "notes.pth"
    text_file.write_text("not a checkpoint")
    args = ["--data", str(brightness_segmentation), "--checkpoint", str(text_file)]
    error = _user_error(capsys, *args, *out)
    assert (
        error
        == f"--checkpoint: '{text_file}': not a PyTorch checkpoint (not written by torch.save)"
    )
    assert "Export" not in error
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(export.read_bytes()[:1000])
    args = ["--data", str(brightness_segmentation), "--checkpoint", str(truncated)]
    assert _user_error(capsys, *args, *out).startswith(f"--checkpoint: '{truncated}': ")
    plain = tmp_path / "plain.pth"
    vit = CoTAPVisionTransformer("vit_tiny_patch16_224", use_filter=False)
    torch.save(vit.vit.state_dict(), plain)
    args = ["--data", str(brightness_segmentation), "--checkpoint", str(plain)]
    error = _user_error(capsys, *args, *out)
    assert error.startswith(f"--checkpoint '{plain}': '{plain}' is neither")
    assert error.endswith(
        "Export timm / DINO weights first: python -m lightly_cotap.export "
        "--checkpoint IN --arch NAME --output OUT"
    )
    # an existing config is not replaced without --overwrite
    (tmp_path / "seg.py").write_text("# my edits\n")
    assert _user_error(capsys, *base, *out, "--crop", "64") == (
        f"--output '{tmp_path / 'seg.py'}' exists; pass --overwrite to replace it."
    )
    assert (tmp_path / "seg.py").read_text() == "# my edits\n"


def test_without_mmsegmentation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "mmseg", None)  # import mmseg -> ImportError
    args = ["--data", str(tmp_path), "--checkpoint", str(tmp_path / "x.pth")]
    assert _user_error(capsys, *args, "--output", str(tmp_path / "seg.py")) == (
        'mmseg-config needs mmsegmentation: pip install -e ".[mmseg,mmcv-lite]" '
        "(CPU) or the full mmcv + the mmseg extra (GPU, see the README)."
    )


def test_level_indices() -> None:
    assert level_indices("linear", 1) == [0]
    assert level_indices("fcn", 12) == [7, 11]  # the shipped ViT-S/B configs
    assert level_indices("upernet", 12) == [3, 5, 7, 11]
    assert level_indices("upernet", 24) == [7, 11, 15, 23]  # mmseg's ViT-L
    assert level_indices("upernet", 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="--head upernet reads 4 different blocks"):
        level_indices("upernet", 3)
    with pytest.raises(ValueError, match="--head fcn reads 2 different blocks"):
        level_indices("fcn", 1)


@pytest.mark.slow
def test_export_to_trained_segmenter_with_mmseg_tools(
    export: Path, brightness_segmentation: Path, tmp_path: Path
) -> None:
    """The README's path: mmseg-config, then mmseg's own tools/train.py."""
    import mmseg

    iters = 10
    config = tmp_path / "fcn.py"
    _write_config(
        brightness_segmentation,
        export,
        config,
        "--head",
        "fcn",
        "--iters",
        str(iters),
        "--crop",
        "64",
    )
    train = Path(mmseg.__file__).parent / ".mim" / "tools" / "train.py"
    work = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, str(train), str(config), "--work-dir", str(work)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    # quiet: none of the six known messages, no warning at all
    for _, message, _ in IRRELEVANT_WARNINGS:
        assert message not in log
    for message, _ in IRRELEVANT_LOG_MESSAGES:
        assert message not in log
    assert "Warning" not in log and " - WARNING - " not in log, log[-3000:]
    # the position embedding trained at 32 px is resampled for the 64 px crop
    assert "pos_embed resampled from the checkpoint's 4x4 patch grid to 8x8" in log
    # the logged lr is the base rate (the head's group), warm-up then poly decay
    lrs = [
        (float(m.group(1)), float(m.group(2)))
        for m in re.finditer(r"base_lr: (\S+) lr: (\S+)", log)
    ]
    assert len(lrs) == iters and all(base == lr for base, lr in lrs)
    assert lrs[1][1] == 1e-4 and lrs[-1][1] == 0.0
    # validation and checkpoints every tenth of --iters, and a final mIoU
    mious = [float(m) for m in re.findall(r"mIoU: (\S+)", log)]
    assert len(mious) == iters and all(0.0 <= m <= 100.0 for m in mious)
    assert math.isfinite(mious[-1])
    assert (work / f"iter_{iters}.pth").is_file()
