"""``lightly-cotap train`` on the paths of an unlucky user: bad flags and files fail
before any work with one line, a run folder is never overwritten silently, resume
restores the run's settings, small or partly unreadable data sets still train.

The trainings are tiny (1-block ViT, 32 px crops, 1-3 steps, a few seconds each).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from lightly_cotap.cli import main
from lightly_cotap.data.neighbors import NeighborIndex
from lightly_cotap.export import export_backbone
from lightly_cotap.models import CoTAPVisionTransformer

TINY = [
    "--num-threads",
    "1",
    "--depth",
    "1",
    "--global-crop-size",
    "32",
    "--local-crop-size",
    "16",
    "--pool-sizes",
    "2",
    "4",
    "--no-visualize",
    "--no-progress-bar",
    "--log-every-n-steps",
    "1",
]


def _train(out: Path, *args: str) -> int:
    try:
        return main(["train", "--output-dir", str(out), *args])
    except SystemExit as ex:
        return int(ex.code or 0)


def _step(checkpoint: Path) -> int:
    return int(
        torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]
    )


def _photos(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    paths = []
    for i in range(count):
        image = Image.fromarray(photos[i % 3]).resize((48, 48))
        paths.append(folder / f"photo{i}.jpg")
        image.rotate(90 * (i // 3)).save(paths[-1])
    return paths


def _exported_tiny(path: Path, embed_dim: int) -> Path:
    model = CoTAPVisionTransformer(
        "vit_tiny_patch16_224",
        img_size=32,
        depth=1,
        embed_dim=embed_dim,
        num_heads=3,
        num_prototypes=2,
    )
    export_backbone(model, path)
    return path


def _case(case: str, tmp_path: Path) -> list[str]:
    """Arguments of one bad call (files made in tmp_path)."""
    if case == "negative_batch":
        return ["--batch-size", "-3"]
    if case == "resnet":
        return ["--backbone", "resnet50"]
    if case == "unknown_model":
        return ["--backbone", "vit_made_up_224"]
    if case == "p_self":
        return ["--p-self", "1.5"]
    if case == "pool_sizes":
        return ["--pool-sizes", "7", "14"]
    if case == "crop_size":
        return ["--global-crop-size", "36"]
    if case == "missing_data":
        return ["--data", str(tmp_path / "nope"), "--preset", "demo"]
    if case == "empty_data":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("no images here")
        return ["--data", str(tmp_path / "empty"), "--preset", "demo"]
    if case == "one_image":
        _photos(tmp_path / "one", 1)
        return ["--data", str(tmp_path / "one"), "--preset", "demo"]
    if case == "init_text":
        (tmp_path / "init.pth").write_text("not a checkpoint")
        return ["--init", str(tmp_path / "init.pth")]
    if case == "init_truncated":
        data = _exported_tiny(tmp_path / "full.pth", 96).read_bytes()
        (tmp_path / "init.pth").write_bytes(data[: len(data) // 2])
        return ["--init", str(tmp_path / "init.pth")]
    if case == "init_other_architecture":
        return ["--init", str(_exported_tiny(tmp_path / "init.pth", 192))]
    if case == "init_pickled_object":
        torch.save({"state_dict": {}, "args": Path("x")}, tmp_path / "init.pth")
        return ["--init", str(tmp_path / "init.pth")]
    if case == "resume_backbone_export":
        return ["--resume", str(_exported_tiny(tmp_path / "backbone.pth", 96))]
    if case == "resume_nothing":
        return ["--resume"]
    if case == "resume_and_overwrite":
        return ["--resume", "--overwrite"]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case, message",
    [
        ("negative_batch", "--batch-size: -3: must be an integer >= 1"),
        ("resnet", "--backbone: 'resnet50': is not a timm VisionTransformer"),
        ("unknown_model", "--backbone: 'vit_made_up_224': is not a timm model name"),
        ("p_self", "--p-self: 1.5: must lie in [0, 1]"),
        ("pool_sizes", "--pool-sizes: [7, 14]: must fit the 4 x 4 patch grid"),
        ("crop_size", "--global-crop-size: 36: must be a multiple of the patch size 8"),
        ("missing_data", "is not a folder of images"),
        ("empty_data", "holds no images"),
        ("one_image", "holds 1 readable image(s); CoTAP pairs every image"),
        ("init_text", "not a PyTorch checkpoint"),
        ("init_truncated", "truncated or damaged"),
        (
            "init_other_architecture",
            "Checkpoint does not fit the model architecture (another ViT size, patch "
            "size or number of prototypes?): cls_token: checkpoint shape (1, 1, 192) "
            "vs model shape (1, 1, 96); ",
        ),
        ("init_pickled_object", "python -m lightly_cotap.export --checkpoint FILE"),
        ("resume_backbone_export", "is not a lightly-cotap training checkpoint"),
        ("resume_nothing", "holds no checkpoints/last.ckpt to resume"),
        ("resume_and_overwrite", "--overwrite: True: cannot be combined with"),
    ],
)
def test_bad_input_fails_before_any_work(
    case: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _train(out, *TINY, *_case(case, tmp_path)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("lightly-cotap train: error: ")
    assert message in lines[0]
    assert "Traceback" not in err
    if case == "negative_batch":
        assert "-12" not in err
    if case == "init_other_architecture":
        assert lines[0].endswith(
            "pass the --backbone (and --patch-size, --depth, "
            "--embed-dim, --num-heads) it was trained with"
        )
    if case in ("init_text", "init_truncated"):
        assert "weights_only" not in err and "--unsafe-load" not in err
        assert "PytorchStreamReader" not in err
    # Refused before any work: nothing written.
    assert not (out / "settings.json").exists()
    assert not (out / "neighbors.npz").exists()
    assert not (out / "checkpoints").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--batch-size: 0"):
        main(["train", "--output-dir", str(tmp_path), "--batch-size", "0", "--debug"])


def test_run_folder_is_kept_resumed_and_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _train(out, *TINY, "--max-steps", "2", "--num-neighbors", "2") == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["depth"] == 1 and settings["max_steps"] == 2
    assert settings["pool_sizes"] == [2, 4] and settings["num_neighbors"] == 2
    assert NeighborIndex.load(out / "neighbors.npz").k == 2
    backbone = (out / "backbone.pth").read_bytes()
    capsys.readouterr()

    # A second run into the same folder is refused; nothing is touched.
    assert _train(out, *TINY, "--max-steps", "2") == 2
    assert "holds a run" in capsys.readouterr().err
    assert (out / "backbone.pth").read_bytes() == backbone

    # --resume without a path continues the folder's run with its settings (here
    # a 1-block ViT on 32 px crops, which the demo preset would not give).
    args = ["--resume", "--max-steps", "3", "--no-visualize", "--num-threads", "1"]
    assert _train(out, *args) == 0
    assert "--max-steps: 3 overrides the resumed run's 2" in capsys.readouterr().err
    assert _step(out / "checkpoints" / "last.ckpt") == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["max_steps"] == 3 and settings["depth"] == 1

    # The architecture of a resumed run cannot change.
    assert _train(out, "--resume", "--depth", "2", "--max-steps", "4") == 2
    assert "a resumed run keeps its architecture and weights" in (
        capsys.readouterr().err
    )

    # --overwrite starts a new run in the folder: no last-v1.ckpt next to the old
    # checkpoint, and the neighbour cache is rebuilt for the new k.
    assert (
        _train(out, *TINY, "--overwrite", "--max-steps", "1", "--num-neighbors", "1")
        == 0
    )
    assert "rebuilding it" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]
    assert _step(out / "checkpoints" / "last.ckpt") == 1
    assert NeighborIndex.load(out / "neighbors.npz").k == 1
    assert json.loads((out / "settings.json").read_text())["max_steps"] == 1


def test_small_data_with_unreadable_images_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    _photos(data, 2)
    grey16 = (np.arange(48 * 48).reshape(48, 48) * 28).astype(np.uint16)
    Image.fromarray(grey16).save(data / "depth16.png")
    (data / "empty.jpg").write_bytes(b"")
    truncated = (data / "photo0.jpg").read_bytes()
    (data / "cut.jpg").write_bytes(truncated[: len(truncated) // 2])
    common = [*TINY, "--data", str(data), "--preset", "demo", "--max-steps", "2"]

    assert _train(tmp_path / "strict", *common, "--strict") == 2
    err = capsys.readouterr().err
    assert "--data" in err and "2 of 5 images cannot be read" in err
    assert "empty.jpg" in err and "cut.jpg" in err
    assert not (tmp_path / "strict" / "settings.json").exists()

    out = tmp_path / "run"
    assert _train(out, *common, "--batch-size", "8") == 0
    err = capsys.readouterr().err
    assert "skipping 2 of 5 images" in err and "empty.jpg" in err
    assert "--batch-size: 8 is more than the 3 images per process" in err
    assert "--num-neighbors: 3 is more than the other 2 images: using 2" in err
    assert _step(out / "checkpoints" / "last.ckpt") == 2
    settings = json.loads((out / "settings.json").read_text())
    assert settings["batch_size"] == 3 and settings["num_neighbors"] == 2
    assert settings["data"] == str(data.resolve())


def test_zero_steps_never_succeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without the batch adaptation, 8 sample images in batches of 16 give no batch.
    monkeypatch.setattr(
        "lightly_cotap.train.run.fit_to_dataset", lambda *args, **kwargs: None
    )
    out = tmp_path / "run"
    assert _train(out, *TINY, "--batch-size", "16", "--max-steps", "2") == 2
    assert "no training step ran" in capsys.readouterr().err
    assert not (out / "backbone.pth").exists()


def test_settings_are_written_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("killed during training")

    monkeypatch.setattr("pytorch_lightning.Trainer.fit", crash)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        main(["train", "--output-dir", str(out), *TINY, "--max-steps", "7"])
    settings = json.loads((out / "settings.json").read_text())
    assert settings["max_steps"] == 7 and settings["global_crop_size"] == 32


def test_neighbor_cache_key_follows_its_inputs(tmp_path: Path) -> None:
    from lightly_cotap.train.run_builders import neighbor_cache_key
    from lightly_cotap.train.settings import DEMO_PRESET, RUN_DEFAULTS

    files = _photos(tmp_path / "data", 3)
    init = _exported_tiny(tmp_path / "init.pth", 96)
    settings = {**DEMO_PRESET, **RUN_DEFAULTS, "num_neighbors": 2}
    key = neighbor_cache_key(files, settings)
    assert neighbor_cache_key(list(files), dict(settings)) == key
    changed = [
        neighbor_cache_key(files[:2], settings),
        neighbor_cache_key(files, {**settings, "num_neighbors": 1}),
        neighbor_cache_key(files, {**settings, "init": str(init)}),
        neighbor_cache_key(files, {**settings, "seed": 1}),
        neighbor_cache_key(files, {**settings, "depth": 2}),
    ]
    Image.fromarray(skimage.data.camera()).resize((48, 48)).save(files[0])
    changed.append(neighbor_cache_key(files, settings))  # same name, new content
    assert len({key, *changed}) == len(changed) + 1
