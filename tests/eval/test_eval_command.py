from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from lightly_cotap.cli import main
from lightly_cotap.data.copy_paste_scenes import CopyPasteScenes
from lightly_cotap.export import export_backbone
from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer

SIZE = 32
NUM_CLASSES = 4  # background + the 3 object classes of copy_paste_inputs
EVALUATIONS = ("linear_probe", "kmeans", "overclustering", "retrieval")


@pytest.fixture(scope="module")
def scenes(
    tmp_path_factory: pytest.TempPathFactory, copy_paste_inputs: tuple[Path, Path]
) -> Path:
    """``train/`` and ``test/`` image + mask folders of copy-paste scenes."""
    root = tmp_path_factory.mktemp("eval_command")
    objects, backgrounds = copy_paste_inputs
    for split, num, seed in (("train", 12, 0), ("test", 6, 1)):
        CopyPasteScenes(
            objects,
            backgrounds,
            split=split,  # type: ignore[arg-type]
            num_samples=num,
            image_size=SIZE,
            seed=seed,
            max_background_side=128,
        ).save(root / split, image_format="png", progress=False)
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = CoTAPVisionTransformer(
        "vit_tiny_patch16_224", depth=2, img_size=SIZE, num_prototypes=4
    )
    path = tmp_path_factory.mktemp("ckpt") / "backbone.pth"
    export_backbone(model, path)
    return path


def _args(scenes: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "--checkpoint",
        str(checkpoint),
        "--images",
        str(scenes / "train/images"),
        "--masks",
        str(scenes / "train/masks"),
        "--image-size",
        str(SIZE),
        "--label-size",
        "16",
        "--probe-steps",
        "30",
        "--batch-size",
        "8",
        "--num-visualize",
        "3",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def _check_metrics(report: dict[str, Any], num_classes: int) -> None:
    for name in EVALUATIONS:
        result = report[name]
        assert 0.0 <= result["miou"] <= 1.0, name
        assert 0.0 <= result["pixel_accuracy"] <= 1.0, name
        assert len(result["iou_per_class"]) == num_classes, name
        assert result["seconds"] >= 0.0


def test_eval_exported_backbone_end_to_end(
    scenes: Path, exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    val = [
        "--val-images",
        str(scenes / "test/images"),
        "--val-masks",
        str(scenes / "test/masks"),
    ]
    assert main(_args(scenes, exported, out, *val)) == 0
    report = json.loads((out / "report.json").read_text())
    _check_metrics(report, NUM_CLASSES)
    settings = report["settings"]
    assert settings["num_classes"] == NUM_CLASSES  # inferred from the masks
    assert settings["num_train_images"] == 12 and settings["num_val_images"] == 6
    assert settings["class_names"] == ["background", "cat", "cup", "rocket"]
    # 2 * 192 channels (object-aware filter) on a 2 x 2 patch grid.
    assert settings["feature_shape"] == [2, 2, 384]  # channel-last (h, w, D)
    assert report["checkpoint"]["use_filter"] is True
    assert report["overclustering"]["settings"]["num_clusters"] == 4 * NUM_CLASSES
    for name in ("pca.png", "similarity.png"):
        with Image.open(out / name) as image:
            assert image.mode == "RGB"
            # 3 rows (images) of 2 cells of 32 px.
            assert image.height >= 3 * SIZE and image.width >= 2 * SIZE
    printed = capsys.readouterr().out
    for name in EVALUATIONS:
        assert f"| {name} | {100 * report[name]['miou']:.2f} |" in printed
    assert "| rocket |" in printed


def test_eval_training_checkpoint_with_val_fraction(
    scenes: Path, tmp_path: Path
) -> None:
    # A Lightning-style training checkpoint without meta: student and teacher copies
    # of a plain ViT (no filter); the student is selected, --arch rebuilds it.
    torch.manual_seed(1)
    student = CoTAPVisionTransformer(
        "vit_tiny_patch16_224", use_filter=False, img_size=SIZE
    )
    teacher_state = {k: torch.zeros_like(v) for k, v in student.state_dict().items()}
    state_dict = {f"student_backbone.{k}": v for k, v in student.state_dict().items()}
    state_dict |= {f"teacher_backbone.{k}": v for k, v in teacher_state.items()}
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": state_dict, "epoch": 3}, checkpoint)
    out = tmp_path / "out"
    args = _args(
        scenes,
        checkpoint,
        out,
        "--arch",
        "vit_tiny_patch16_224",
        "--val-fraction",
        "0.25",
        "--num-classes",
        "5",
        "--skip",
        "overclustering",
        "--num-visualize",
        "0",
    )
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert "overclustering" not in report and "visualizations" not in report
    for name in ("linear_probe", "kmeans", "retrieval"):
        assert len(report[name]["iou_per_class"]) == 5
    assert report["settings"]["num_train_images"] == 9
    assert report["settings"]["num_val_images"] == 3
    assert report["settings"]["feature_shape"] == [2, 2, 192]
    assert report["checkpoint"]["use_filter"] is False
    assert not (out / "pca.png").exists()


def _no_match(tmp: Path, scenes: Path) -> Path:
    masks = tmp / "renamed_masks"
    masks.mkdir()
    for path in sorted((scenes / "train/masks").iterdir()):
        (masks / f"x{path.name}").write_bytes(path.read_bytes())
    return masks


def _rgb_masks(tmp: Path, scenes: Path) -> Path:
    masks = tmp / "rgb_masks"
    masks.mkdir()
    for path in sorted((scenes / "train/masks").iterdir()):
        Image.open(path).convert("RGB").save(masks / path.name)
    return masks


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_images", "--images"),
        ("no_matching_stems", "no mask"),
        ("rgb_masks", "single-channel"),
        ("text_checkpoint", "not a PyTorch checkpoint"),
        ("garbage_checkpoint", "not a PyTorch checkpoint"),
        ("no_meta_no_arch", "--arch"),
        ("missing_checkpoint", "no such file"),
        ("too_few_classes", "--num-classes"),
        ("val_images_only", "--val-masks"),
    ],
)
def test_eval_bad_inputs(
    case: str,
    message: str,
    scenes: Path,
    exported: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("previous")  # must survive a failed run
    checkpoint = exported
    args = _args(scenes, checkpoint, out)
    if case == "missing_images":
        args[args.index("--images") + 1] = str(tmp_path / "nope")
    elif case == "no_matching_stems":
        args[args.index("--masks") + 1] = str(_no_match(tmp_path, scenes))
    elif case == "rgb_masks":
        args[args.index("--masks") + 1] = str(_rgb_masks(tmp_path, scenes))
    elif case == "text_checkpoint":
        checkpoint = tmp_path / "notes.pth"
        checkpoint.write_text("not a checkpoint")
        args[args.index("--checkpoint") + 1] = str(checkpoint)
    elif case == "garbage_checkpoint":
        checkpoint = tmp_path / "garbage.pth"
        checkpoint.write_bytes(b"hello")
        args[args.index("--checkpoint") + 1] = str(checkpoint)
    elif case == "no_meta_no_arch":
        checkpoint = tmp_path / "timm.pth"
        model = CoTAPVisionTransformer(
            "vit_tiny_patch16_224", depth=2, use_filter=False, img_size=SIZE
        )
        torch.save(model.vit.state_dict(), checkpoint)
        args[args.index("--checkpoint") + 1] = str(checkpoint)
    elif case == "missing_checkpoint":
        args[args.index("--checkpoint") + 1] = str(tmp_path / "missing.pth")
    elif case == "too_few_classes":
        args += ["--num-classes", "2"]
    elif case == "val_images_only":
        args += ["--val-images", str(scenes / "test/images")]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "lightly-cotap eval: error:" in err and message in err
    assert "Traceback" not in err
    assert (out / "report.json").read_text() == "previous"
    assert not (out / "pca.png").exists()


def _copy_split(scenes: Path, tmp: Path, classes_json: bool = False) -> Path:
    """A copy of the training images and masks (optionally with classes.json)."""
    root = tmp / "copy"
    for name in ("images", "masks"):
        (root / name).mkdir(parents=True)
        for path in sorted((scenes / "train" / name).iterdir()):
            (root / name / path.name).write_bytes(path.read_bytes())
    if classes_json:
        (root / "classes.json").write_bytes(
            (scenes / "train/classes.json").read_bytes()
        )
    return root


def _folders(args: list[str], root: Path) -> list[str]:
    args[args.index("--images") + 1] = str(root / "images")
    args[args.index("--masks") + 1] = str(root / "masks")
    return args


def _set_pixel(mask_path: Path, value: int) -> None:
    mask = np.array(Image.open(mask_path))
    mask[0, 0] = value
    Image.fromarray(mask).save(mask_path)


@pytest.mark.parametrize("classes_json", [False, True])
def test_eval_refuses_a_stray_label(
    classes_json: bool,
    scenes: Path,
    exported: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = _copy_split(scenes, tmp_path, classes_json)
    stray = sorted((root / "masks").iterdir())[3]
    _set_pixel(stray, 200)  # one pixel: must not make 201 classes
    args = _folders(_args(scenes, exported, tmp_path / "out", "--skip", "kmeans"), root)
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "lightly-cotap eval: error: --masks:" in err and stray.name in err
    assert "200" in err and "--ignore-unknown-labels" in err
    if classes_json:
        assert "classes.json" in err and "lie outside the 4 classes" in err
    assert not (tmp_path / "out" / "report.json").exists()

    # Declared classes + the flag: the pixel is ignored, with a count.
    declared = [] if classes_json else ["--num-classes", str(NUM_CLASSES)]
    assert main([*args, *declared, "--ignore-unknown-labels"]) == 0
    err = capsys.readouterr().err
    assert "ignoring 1 pixels with labels [200]" in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["num_classes"] == NUM_CLASSES
    assert len(report["linear_probe"]["iou_per_class"]) == NUM_CLASSES


def test_eval_reads_0_255_masks_as_binary(
    scenes: Path, exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _copy_split(scenes, tmp_path)
    for path in (root / "masks").iterdir():
        mask = np.array(Image.open(path))
        Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8)).save(path)
    out = tmp_path / "out"
    args = _folders(_args(scenes, exported, out, "--skip", "overclustering"), root)
    assert main(args) == 0
    assert "read as binary masks (0 = background, 255 = class 1)" in (
        capsys.readouterr().err
    )
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["num_classes"] == 2
    for name in ("linear_probe", "kmeans", "retrieval"):
        background, foreground = report[name]["iou_per_class"]
        assert foreground is not None  # scored, not ignored
        assert report[name]["pixel_accuracy"] < 1.0
    # Asked explicitly to ignore 255, only class 0 is left: refused.
    with pytest.raises(SystemExit):
        main([*args, "--ignore-index", "255"])
    assert "every labelled pixel is class [0]" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["swapped_mask", "empty_image"])
def test_eval_refuses_broken_pairs(
    case: str,
    scenes: Path,
    exported: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = _copy_split(scenes, tmp_path)
    image_path = sorted((root / "images").iterdir())[2]
    mask_path = root / "masks" / f"{image_path.stem}.png"
    if case == "swapped_mask":
        Image.open(image_path).resize((48, 32)).save(image_path)
        Image.open(mask_path).resize((32, 48), Image.Resampling.NEAREST).save(mask_path)
    else:
        image_path.write_bytes(b"")
    with pytest.raises(SystemExit) as info:
        main(_folders(_args(scenes, exported, tmp_path / "out"), root))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if case == "swapped_mask":
        assert "--masks:" in err and "differ in size" in err
        assert f"{mask_path.name} is 32x48, {image_path.name} is 48x32" in err
    else:
        assert "--images:" in err and "1 images cannot be read" in err
        assert image_path.name in err and "empty file" in err


def test_eval_reads_both_export_formats(
    scenes: Path, exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("mmseg")
    from lightly_cotap.export import main as export_main

    mmseg_export = tmp_path / "backbone_mmseg.pth"
    assert (
        export_main(
            ["--format", "mmseg", "--checkpoint", str(exported)]
            + ["--output", str(mmseg_export)]
        )
        == 0
    )
    only_probe = ["--skip", "kmeans", "--skip", "overclustering"]
    only_probe += ["--skip", "retrieval", "--num-visualize", "0"]
    reports = []
    for checkpoint in (exported, mmseg_export):
        out = tmp_path / checkpoint.stem
        assert main(_args(scenes, checkpoint, out, *only_probe)) == 0
        reports.append(json.loads((out / "report.json").read_text()))
    for report in reports:
        del report["linear_probe"]["seconds"], report["settings"]["seconds"]
    assert reports[0]["linear_probe"] == reports[1]["linear_probe"]
    assert reports[0]["settings"] == reports[1]["settings"]
    # --no-progress: one line now and then instead of bars
    err = capsys.readouterr().err
    assert re.search(r"^linear probe: 0/30 \(0%\), 00:00$", err, re.M)
    assert re.search(r"^linear probe: 30/30 \(100%\), \d\d:\d\d$", err, re.M)
    assert re.search(r"^train features: \d+/\d+ \(100%\)", err, re.M)
    assert "\r" not in err


def test_eval_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in (
        ("--probe-steps PROBE_STEPS Adam steps of the linear probe.", "500"),
        ("--seed SEED Seed of every evaluation.", "0"),
        ("--image-size IMAGE_SIZE Images are resized to this.", "224"),
        ("--probe-head {bn,plain}", "bn"),
    ):
        assert re.search(
            re.escape(option) + r".*?\(default: " + re.escape(default) + r"\)", text
        ), option
    # options without a default say what happens instead
    assert "held out (default: 0.3)." in text and "(default: None)" not in text
