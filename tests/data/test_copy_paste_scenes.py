from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
import timm
import torch
from PIL import Image
from scipy import ndimage
from torch import Tensor

from lightly_cotap.data.copy_paste_scenes import CopyPasteScenes
from lightly_cotap.data.copy_paste_sources import (
    debian_backgrounds,
    is_photo_cutout,
    tuxpaint_class_folders,
)
from lightly_cotap.data.segmentation_folder import SegmentationFolder
from lightly_cotap.eval import evaluate_dense


@pytest.fixture
def inputs(copy_paste_inputs: tuple[Path, Path]) -> tuple[Path, Path]:
    return copy_paste_inputs


def _scenes(inputs: tuple[Path, Path], **kwargs: Any) -> CopyPasteScenes:
    defaults: dict[str, Any] = dict(
        num_samples=20, image_size=64, max_background_side=256
    )
    return CopyPasteScenes(*inputs, **{**defaults, **kwargs})


def test_deterministic_by_seed(inputs: tuple[Path, Path]) -> None:
    a, b, c = _scenes(inputs, seed=3), _scenes(inputs, seed=3), _scenes(inputs, seed=4)
    differs = False
    for i in range(8):
        img_a, mask_a = a.sample(i)
        img_b, mask_b = b.sample(i)
        assert np.array_equal(np.asarray(img_a), np.asarray(img_b))
        assert np.array_equal(mask_a, mask_b)
        img_a2, _ = a.sample(i)  # cached objects / backgrounds give the same pixels
        assert np.array_equal(np.asarray(img_a), np.asarray(img_a2))
        differs |= not np.array_equal(mask_a, c.sample(i)[1])
    assert differs


def test_mask_aligns_with_pasted_pixels(inputs: tuple[Path, Path]) -> None:
    # Backgrounds are gray (R = G = B), cut-outs are colour photos: every pixel away
    # from a labelled region must be untouched gray, and labelled pixels must be colour.
    scenes = _scenes(inputs, split="all", seed=1)
    total_interior = 0
    for i in range(len(scenes)):
        layout = scenes.layout(i)
        image, mask = scenes.render(layout)
        arr = np.asarray(image).astype(int)
        assert (
            arr.shape == (64, 64, 3)
            and mask.shape == (64, 64)
            and mask.dtype == np.uint8
        )
        gray = (arr[..., 0] == arr[..., 1]) & (arr[..., 1] == arr[..., 2])
        fg = mask > 0
        far_background = ~ndimage.binary_dilation(fg, iterations=2)
        assert gray[far_background].all()
        interior = ndimage.binary_erosion(fg, iterations=2)
        total_interior += int(interior.sum())
        if interior.any():
            assert (~gray[interior]).mean() > 0.95
        assert set(np.unique(mask)) <= {0} | {o.class_id for o in layout.objects}
        for obj in layout.objects:
            ys, xs = np.nonzero(mask == obj.class_id)
            if len(layout.objects) == 1 and ys.size:
                x0, y0, x1, y1 = obj.box
                assert (
                    x0 <= xs.min()
                    and xs.max() < x1
                    and y0 <= ys.min()
                    and ys.max() < y1
                )
    assert total_interior > 1000  # the check saw real objects


def test_objects_per_scene_and_scale(inputs: tuple[Path, Path]) -> None:
    scenes = _scenes(inputs, num_samples=30)
    counts = {len(scenes.layout(i).objects) for i in range(30)}
    assert counts == {1, 2, 3}
    for i in range(30):
        for obj in scenes.layout(i).objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert 0.3 * 64 - 1 <= max(x1 - x0, y1 - y0) <= 0.7 * 64 + 1
    two = _scenes(inputs, num_objects=(2, 2))
    assert all(len(two.layout(i).objects) == 2 for i in range(10))


def test_train_test_splits_are_disjoint(inputs: tuple[Path, Path]) -> None:
    train = _scenes(inputs, split="train", seed=0)
    test = _scenes(inputs, split="test", seed=1)
    everything = _scenes(inputs, split="all")
    assert (
        train.class_names == test.class_names == ["background", "cat", "cup", "rocket"]
    )
    for class_id in train.objects:
        tr, te = set(train.objects[class_id]), set(test.objects[class_id])
        assert tr and te and not tr & te
        assert tr | te == set(everything.objects[class_id])
    assert not set(train.backgrounds) & set(test.backgrounds)
    assert set(train.backgrounds) | set(test.backgrounds) == set(everything.backgrounds)
    for dataset in (train, test):
        pools = {p for v in dataset.objects.values() for p in v}
        for i in range(len(dataset)):
            layout = dataset.layout(i)
            assert layout.background in dataset.backgrounds
            assert all(o.path in pools for o in layout.objects)
    # The partition depends on split_seed only, not on the sampling seed.
    assert _scenes(inputs, split="test", seed=7).objects == test.objects
    other = [
        _scenes(inputs, split="test", split_seed=s).backgrounds for s in range(1, 6)
    ]
    assert any(b != test.backgrounds for b in other)


def test_object_split_all_keeps_the_background_split(
    inputs: tuple[Path, Path],
) -> None:
    train = _scenes(inputs, split="train")
    pool = _scenes(inputs, split="train", object_split="all", seed=3)
    everything = _scenes(inputs, split="all")
    assert pool.objects == everything.objects != train.objects
    assert pool.backgrounds == train.backgrounds != everything.backgrounds
    assert pool.object_split == "all" and train.object_split == "train"
    for i in range(len(pool)):
        assert pool.layout(i).background in train.backgrounds
    with pytest.raises(ValueError, match="object_split must be"):
        _scenes(inputs, object_split="val")


def test_getitem_tensors_and_transform(inputs: tuple[Path, Path]) -> None:
    scenes = _scenes(inputs, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    image, mask = scenes[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    raw, raw_mask = scenes.sample(0)
    torch.testing.assert_close(
        image, torch.from_numpy(np.array(raw)).permute(2, 0, 1).float() / 255
    )
    assert mask.dtype == torch.int64 and torch.equal(
        mask, torch.from_numpy(raw_mask).long()
    )
    sized = _scenes(inputs, transform=lambda im: im.size)
    assert sized[0][0] == (64, 64)
    with pytest.raises(IndexError):
        scenes.layout(20)


def test_save_and_reload(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    scenes = _scenes(inputs, split="test", num_samples=4)
    out = scenes.save(tmp_path / "test", image_format="png", progress=False)
    assert sorted(p.name for p in (out / "masks").iterdir()) == [
        f"0000{i}.png" for i in range(4)
    ]
    meta = json.loads((out / "classes.json").read_text())
    assert meta["split"] == meta["object_split"] == "test"
    folder = SegmentationFolder(
        out / "images", out / "masks", image_size=None, mean=[0, 0, 0], std=[1, 1, 1]
    )
    assert len(folder) == 4
    for i in range(4):
        image, mask = folder[i]
        raw, raw_mask = scenes.sample(i)
        assert torch.equal(mask, torch.from_numpy(raw_mask).long())
        expected = torch.from_numpy(np.array(raw)).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(image, expected)


def test_invalid_arguments(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    objects, backgrounds = inputs
    with pytest.raises(ValueError, match="objects_root"):
        CopyPasteScenes(tmp_path / "missing", backgrounds)
    with pytest.raises(ValueError, match="num_objects"):
        _scenes(inputs, num_objects=(2, 1))
    with pytest.raises(ValueError, match="object_scale"):
        _scenes(inputs, object_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="split"):
        _scenes(inputs, split="val")
    with pytest.raises(ValueError, match="class folder"):
        _scenes(inputs, classes=["cat", "dog"])
    lonely = tmp_path / "lonely"
    (lonely / "cat").mkdir(parents=True)
    Image.open(next((objects / "cat").iterdir())).save(lonely / "cat" / "only.png")
    with pytest.raises(ValueError, match="at least 2"):
        CopyPasteScenes(lonely, backgrounds, split="train")
    assert len(CopyPasteScenes(lonely, backgrounds, split="all", num_samples=2)) == 2


def test_photo_filter_and_tuxpaint_layout(
    tmp_path: Path, copy_paste_inputs: tuple[Path, Path]
) -> None:
    stamps = tmp_path / "stamps"
    photo = skimage.data.chelsea()
    cut = Image.open(copy_paste_inputs[0] / "cat" / "cat0.png")  # hard-edged cut-out
    flat = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    flat.paste((255, 0, 0, 255), (20, 20, 80, 80))  # clip-art: one colour
    files = {
        "animals/mammals/cat.png": cut,
        "animals/mammals/cartoon/cat.png": cut,  # cartoon folder: dropped
        "animals/birds/flat.png": flat,  # too few colours: dropped
        "food/fruit/small.png": cut.resize((40, 40)),  # too small: dropped
        "food/fruit/cat_la.png": cut.convert("LA"),  # not RGBA: dropped
        "military/vehicles/tank.png": cut,
        "people/person.png": cut,  # no class: dropped
        "household/opaque.png": Image.fromarray(
            np.dstack([photo[:100, :100], np.full((100, 100), 255, np.uint8)])
        ),
    }
    for rel, image in files.items():
        (stamps / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(stamps / rel)
    assert is_photo_cutout(cut) and not is_photo_cutout(flat)
    counts = tuxpaint_class_folders(stamps, tmp_path / "objects", progress=False)
    assert counts == {
        "mammal": 1,
        "bird": 0,
        "other_animal": 0,
        "plant": 0,
        "food": 0,
        "vehicle": 1,
        "object": 0,
    }
    assert (tmp_path / "objects/mammal/animals__mammals__cat.png").is_file()
    assert (tmp_path / "objects/vehicle/military__vehicles__tank.png").is_file()
    with pytest.raises(ValueError, match="stamps_root"):
        tuxpaint_class_folders(tmp_path / "nope", tmp_path / "o")


def test_debian_backgrounds_layout(tmp_path: Path) -> None:
    root = tmp_path / "root"
    mate = root / "usr/share/backgrounds/mate/nature"
    mate.mkdir(parents=True)
    Image.fromarray(skimage.data.coffee()).save(mate / "Coffee.jpg")
    plasma = root / "usr/share/wallpapers/Path/contents/images"
    plasma.mkdir(parents=True)
    Image.fromarray(skimage.data.rocket()).save(plasma / "1920x1080.jpg")
    Image.fromarray(skimage.data.rocket()).save(plasma / "640x480.jpg")
    written = debian_backgrounds(root, tmp_path / "bg", max_side=300)
    assert sorted(p.name for p in written) == ["mate_Coffee.jpg", "plasma_Path.jpg"]
    for path in written:
        with Image.open(path) as im:
            assert max(im.size) == 300


def _tiny_vit_features() -> tuple[torch.nn.Module, Any]:
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=64, depth=1, num_classes=0
    )

    def feature_fn(x: Tensor) -> Tensor:
        tokens: Tensor = vit.forward_features(x)[:, vit.num_prefix_tokens :]
        return tokens.reshape(x.shape[0], 4, 4, -1)

    return vit, feature_fn


def test_scenes_feed_the_dense_evaluation(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    # End to end: scenes on disk -> SegmentationFolder -> evaluate_dense on a ViT.
    for split, seed, n in (("train", 0, 8), ("test", 1, 4)):
        _scenes(inputs, split=split, seed=seed, num_samples=n).save(
            tmp_path / split, progress=False
        )
    train = SegmentationFolder(
        tmp_path / "train/images", tmp_path / "train/masks", image_size=64
    )
    val = SegmentationFolder(
        tmp_path / "test/images", tmp_path / "test/masks", image_size=64
    )
    vit, feature_fn = _tiny_vit_features()
    result = evaluate_dense(
        feature_fn,
        train,
        val,
        4,
        label_size=32,
        module=vit,
        linear_probe={"steps": 20},
        kmeans={"n_init": 1},
        visualize_dir=tmp_path / "vis",
        num_visualize=2,
        progress=False,
    )
    for name in ("linear_probe", "kmeans", "overclustering", "retrieval"):
        assert 0.0 <= result[name]["miou"] <= 1.0
        assert 0.0 <= result[name]["pixel_accuracy"] <= 1.0
    assert result["settings"]["feature_shape"] == [4, 4, 192]
    assert Path(result["visualizations"]["pca"]).is_file()
