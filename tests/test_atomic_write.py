"""Every file the package writes is replaced atomically: a write killed half-way
leaves the earlier file intact and no temporary file behind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from lightly_cotap.atomic_write import atomic_path, write_json
from lightly_cotap.data.neighbors import NeighborIndex
from lightly_cotap.eval.visualize import save_image_grid
from lightly_cotap.export import export_backbone, export_mmseg_backbone
from lightly_cotap.models import CoTAPVisionTransformer
from lightly_cotap.train.run_folder import atomic_checkpoint_io

EARLIER = b"the earlier, complete file"


class _Killed(Exception):
    """Stands for the process being killed in the middle of a write."""


def _half_write(target: Any) -> None:
    with open(target, "wb") as f:
        f.write(b"half a file")
    raise _Killed


@pytest.fixture
def killed_writers(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save, np.savez, PIL's save and Lightning's checkpoint writer write half
    a file, then 'die'.
    """
    half_write = _half_write
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: half_write(f))
    monkeypatch.setattr(
        "lightning_fabric.plugins.io.torch_io._atomic_save",
        lambda checkpoint, path: half_write(path),
    )
    monkeypatch.setattr(np, "savez", lambda file, *a, **k: half_write(file))
    monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: half_write(fp))


def _tiny_vit() -> CoTAPVisionTransformer:
    return CoTAPVisionTransformer(
        "vit_tiny_patch16_224", img_size=32, depth=1, num_prototypes=2
    )


def _lightning_checkpoint(path: Path) -> None:
    atomic_checkpoint_io().save_checkpoint({"state_dict": {}}, path)


WRITERS: dict[str, tuple[str, Callable[[Path], Any]]] = {
    "export_backbone": ("backbone.pth", lambda p: export_backbone(_tiny_vit(), p)),
    "export_mmseg": ("mmseg.pth", lambda p: export_mmseg_backbone(_tiny_vit(), p)),
    "lightning_checkpoint": ("last.ckpt", _lightning_checkpoint),
    "image_grid": (
        "grid.png",
        lambda p: save_image_grid([[torch.zeros(3, 4, 4, dtype=torch.uint8)]], p),
    ),
    "neighbor_index": (
        "neighbors.npz",
        lambda p: NeighborIndex([[1], [0]]).save(p, cache_key="k"),
    ),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_killed_write_keeps_earlier_file(
    writer: str, tmp_path: Path, killed_writers: None
) -> None:
    name, write = WRITERS[writer]
    target = tmp_path / name
    target.write_bytes(EARLIER)
    with pytest.raises(_Killed):
        write(target)
    assert target.read_bytes() == EARLIER
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_atomic_path_replaces_on_success_only(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.json"
    with atomic_path(target) as tmp:
        # Same folder (same file system, os.replace is atomic), same suffix.
        assert tmp.parent == target.parent and tmp.suffix == ".json"
        assert tmp.name.startswith(".")  # hidden: not picked up as data
        tmp.write_text("{}")
        assert not target.exists()
    assert target.read_text() == "{}"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("failed half-way")
    assert target.read_text() == "{}"
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_write_json_refuses_nan_and_keeps_earlier(tmp_path: Path) -> None:
    path = write_json(tmp_path / "settings.json", {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    with pytest.raises(ValueError):
        write_json(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
