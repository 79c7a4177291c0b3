from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmseg")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmseg.registry import DATASETS, MODELS  # noqa: E402

import lightly_cotap.mmseg  # noqa: E402,F401

CONFIG_DIR = Path(__file__).resolve().parents[2] / "mmseg_configs"
CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.py") if "_base_" not in p.parts)
# mmseg convention: {head}_{method}-{backbone}_{gpus}xb{batch}-{iters}k_{data}-{HxW}
NAME = re.compile(
    r"^(?P<head>linear|fcn|upernet)_(?P<method>[a-z]+)-vit-(?P<size>[sb])16_"
    r"(?P<gpus>\d+)xb(?P<batch>\d+)-(?P<iters>\d+)k_"
    r"(?P<data>voc12aug|cocostuff27|ade20k|cityscapes)-(?P<h>\d+)x(?P<w>\d+)$"
)
DATA_TYPES = {
    "voc12aug": "PascalVOCDataset",
    "cocostuff27": "COCOStuff27Dataset",
    "ade20k": "ADE20KDataset",
    "cityscapes": "CityscapesDataset",
}
ARCHS = {"s": ("vit_small_patch16_224", 384), "b": ("vit_base_patch16_224", 768)}


def test_config_set_is_complete() -> None:
    names = {p.stem for p in CONFIGS}
    for head in ("linear", "fcn", "upernet"):
        for size in ("s", "b"):
            for data in DATA_TYPES:
                assert any(
                    n.startswith(f"{head}_cotap-vit-{size}16_") and f"_{data}-" in n
                    for n in names
                ), (head, size, data)


def test_every_config_parses_and_builds() -> None:
    """Parses every config, checks it against its name and builds its model.

    The models are built on the meta device (no memory, no init cost) and run on
    a meta batch, which checks the channel wiring backbone -> neck -> heads.
    """
    init_default_scope("mmseg")
    assert len(CONFIGS) >= 24
    for path in CONFIGS:
        cfg = Config.fromfile(str(path))
        name = NAME.match(path.stem)
        assert name is not None, f"{path.name} does not follow the naming convention"
        assert "lightly_cotap.mmseg" in cfg.custom_imports["imports"], path.name

        # the name tells the truth
        backbone = cfg.model.backbone
        arch, dim = ARCHS[name["size"]]
        assert backbone.type == "CoTAPViT" and backbone.arch == arch, path.name
        crop = (int(name["h"]), int(name["w"]))
        assert tuple(cfg.crop_size) == crop, path.name
        assert tuple(backbone.img_size) == crop, path.name
        assert tuple(cfg.model.data_preprocessor.size) == crop, path.name
        assert cfg.train_dataloader.batch_size == int(name["batch"]), path.name
        assert cfg.train_cfg.max_iters == int(name["iters"]) * 1000, path.name
        # everything follows max_iters: the lr decay ends there (no `end`: mmengine
        # uses max_iters), validation and checkpoints every tenth
        assert cfg.max_iters == cfg.train_cfg.max_iters, path.name
        assert "end" not in cfg.param_scheduler[-1], path.name
        interval = cfg.max_iters // 10
        assert cfg.train_cfg.val_interval == interval, path.name
        assert cfg.default_hooks.checkpoint.interval == interval, path.name
        assert cfg.runner_type == "QuietRunner", path.name
        dataset = cfg.train_dataloader.dataset
        data_type = dataset.datasets[0].type if "datasets" in dataset else dataset.type
        assert data_type == DATA_TYPES[name["data"]], path.name
        num_classes = len(DATASETS.get(data_type).METAINFO["classes"])
        assert cfg.model.decode_head.num_classes == num_classes, path.name
        if "auxiliary_head" in cfg.model:
            assert cfg.model.auxiliary_head.num_classes == num_classes, path.name
        hooks = [h.type for h in cfg.get("custom_hooks", [])]
        if name["head"] == "linear":
            assert backbone.frozen is True, path.name
            assert "FrozenBackboneCheckHook" in hooks, path.name
        else:
            assert backbone.frozen is False, path.name
            assert (
                cfg.optim_wrapper.constructor
                == "CoTAPLayerDecayOptimWrapperConstructor"
            ), path.name
        if name["method"] == "cotap":
            assert backbone.use_filter is True, path.name

        with torch.device("meta"):
            model = MODELS.build(cfg.model)
            model.eval()
            logits = model(torch.empty(1, 3, 64, 96), mode="tensor")
        assert model.backbone.embed_dim == dim, path.name
        width = 2 * dim if backbone.use_filter else dim
        assert model.backbone.out_channels[-1] == width, path.name
        assert logits.shape[:2] == (1, num_classes), path.name
