from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

SCRIPT = (
    Path(__file__).resolve().parents[2] / "benchmarks" / "prepare_copy_paste_scenes.py"
)


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prepare_copy_paste_scenes", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _disc(mode: str, size: int = 64) -> Image.Image:
    """A grey disc on a transparent square (alpha > 0 inside only)."""
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[inside] = (90, 140, 200, 255)
    image = Image.fromarray(rgba)
    if mode == "LA":
        return image.convert("LA")
    if mode == "P":  # palette clip-art with a transparent colour
        palette = Image.fromarray(inside.astype(np.uint8), "L").convert("P")
        palette.info["transparency"] = 0
        return palette
    return image


def test_stage1_object_pool(tmp_path: Path) -> None:
    prepare = _load()
    stamps = tmp_path / "stamps"
    opaque = Image.new("RGBA", (64, 64), (10, 20, 30, 255))
    files = {
        "animals/mammals/cats/lion-2.png": (_disc("RGBA"), "A lion."),  # held out
        "animals/mammals/cats/lion.png": (_disc("RGBA"), "A lion."),  # same name
        "animals/mammals/cats/cartoon/lion.png": (_disc("RGBA"), None),  # same name
        "animals/mammals/gnu-baby.png": (_disc("RGBA"), None),  # held out
        "animals/mammals/gnu-sitting.png": (_disc("RGBA"), None),  # same first word
        "animals/mammals/big_cat.png": (_disc("RGBA"), "a lion."),  # same text
        "animals/mammals/otter.png": (_disc("RGBA"), "An otter."),
        "animals/mammals/seal.png": (_disc("RGBA"), None),
        "animals/birds/owl.png": (_disc("RGBA"), None),
        "symbols/letter.png": (_disc("LA"), None),
        "symbols/sign.png": (_disc("P"), None),
        "symbols/flat.png": (_disc("RGBA").convert("RGB"), None),  # no alpha
        "town/opaque.png": (opaque, None),  # alpha everywhere: not a cut-out
        "town/tiny.png": (_disc("RGBA", 20), None),  # too small
        "sports/ball.png": (_disc("RGBA"), None),
    }
    for rel, (image, text) in files.items():
        (stamps / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(stamps / rel)
        if text is not None:
            (stamps / rel).with_suffix(".txt").write_text(f"{text}\nfr.utf8=...\n")
    held_out = ["animals/mammals/cats/lion-2.png", "animals/mammals/gnu-baby.png"]
    out = tmp_path / "pool"
    counts = prepare.stage1_object_pool(
        stamps, held_out, out, min_class_size=2, progress=False
    )
    # Two-level folders with enough stamps, else the top-level folder, else other.
    assert counts == {"animals__mammals": 2, "other": 2, "symbols": 2}
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "animals__mammals/animals__mammals__otter.png",
        "animals__mammals/animals__mammals__seal.png",
        "other/animals__birds__owl.png",
        "other/sports__ball.png",
        "symbols/symbols__letter.png",
        "symbols/symbols__sign.png",
    ]
    for path in out.rglob("*.png"):
        with Image.open(path) as image:
            assert image.mode == "RGBA"
            alpha = np.asarray(image.getchannel("A"))
        assert 0 < (alpha > 128).mean() < 1  # the clip-art keeps its transparency
    excluded = json.loads((out / "pool.json").read_text())["excluded"]
    assert excluded == {
        "animals/mammals/cats/lion-2.png": "test cut-out",
        "animals/mammals/gnu-baby.png": "test cut-out",
        "animals/mammals/cats/lion.png": "same name as lion-2.png",
        "animals/mammals/cats/cartoon/lion.png": "same name as lion-2.png",
        "animals/mammals/gnu-sitting.png": "same first word as gnu-baby.png",
        "animals/mammals/big_cat.png": "same description as lion-2.png",
        "symbols/flat.png": "no real alpha channel or too small",
        "town/opaque.png": "no real alpha channel or too small",
        "town/tiny.png": "no real alpha channel or too small",
    }
    with pytest.raises(ValueError, match="held_out stamps not found"):
        prepare.stage1_object_pool(stamps, ["animals/x.png"], tmp_path / "p2")
    with pytest.raises(ValueError, match="stamps_root"):
        prepare.stage1_object_pool(tmp_path / "nope", [], tmp_path / "p3")
