from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor

pytest.importorskip("mmseg")

from mmengine.registry import init_default_scope  # noqa: E402
from mmseg.registry import MODELS, OPTIM_WRAPPERS  # noqa: E402

import lightly_cotap.mmseg  # noqa: E402,F401
from lightly_cotap.export import export_backbone  # noqa: E402
from lightly_cotap.export import main as export_main  # noqa: E402
from lightly_cotap.mmseg import (  # noqa: E402
    CoTAPLayerDecayOptimWrapperConstructor,
    CoTAPViT,
    FrozenBackboneCheckHook,
)
from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer  # noqa: E402

init_default_scope("mmseg")

ARCH = "vit_tiny_patch16_224"
TIMM: dict[str, Any] = dict(
    depth=3, patch_size=8
)  # tiny and fast: 3 blocks, 8x8 patches
IMG = 48


def _plugin(use_filter: bool = True, seed: int = 0) -> CoTAPVisionTransformer:
    torch.manual_seed(seed)
    model = CoTAPVisionTransformer(
        ARCH, use_filter=use_filter, img_size=IMG, num_prototypes=8, **TIMM
    )
    if model.filter is not None:
        model.filter.set_prototypes(torch.randn_like(model.filter.prototypes))
    return model.eval()


def _backbone_cfg(checkpoint: str | None = None, **kwargs: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(
        type="CoTAPViT",
        arch=ARCH,
        img_size=IMG,
        num_prototypes=8,
        timm_kwargs=TIMM,
        out_indices=(0, 1, -1),
    )
    if checkpoint is not None:
        cfg["init_cfg"] = dict(type="Pretrained", checkpoint=checkpoint)
    cfg.update(kwargs)
    return cfg


def _build(checkpoint: str | None = None, **kwargs: Any) -> CoTAPViT:
    backbone = MODELS.build(_backbone_cfg(checkpoint, **kwargs))
    assert isinstance(backbone, CoTAPViT)
    backbone.init_weights()
    backbone.eval()
    return backbone


def _images(h: int = IMG, w: int = 64) -> Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def plugin() -> CoTAPVisionTransformer:
    return _plugin()


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, plugin: Any) -> dict[str, str]:
    root = tmp_path_factory.mktemp("exports")
    timm_path = str(root / "timm.pth")
    export_backbone(plugin, timm_path)
    mmseg_path = str(root / "mmseg.pth")
    assert (
        export_main(
            ["--format", "mmseg", "--checkpoint", timm_path, "--output", mmseg_path]
        )
        == 0
    )
    return {"timm": timm_path, "mmseg": mmseg_path}


@pytest.mark.parametrize("fmt", ["timm", "mmseg"])
def test_equivalence_with_plugin(
    fmt: str, plugin: CoTAPVisionTransformer, exports: dict[str, str]
) -> None:
    backbone = _build(exports[fmt])
    x = _images()
    with torch.no_grad():
        outs = backbone(x)
        ref = plugin(x).dense.permute(0, 3, 1, 2)
        inter = plugin.vit.forward_intermediates(
            x, indices=[0, 1], norm=False, output_fmt="NCHW", intermediates_only=True
        )
    assert [tuple(o.shape) for o in outs] == [(2, 192, 6, 8)] * 2 + [(2, 384, 6, 8)]
    assert backbone.out_channels == [192, 192, 384]
    assert (outs[-1] - ref).abs().max() <= 1e-5
    for out, expected in zip(outs[:2], inter):
        assert (out - expected).abs().max() <= 1e-5


def test_mmseg_format_loads_into_the_plugin(
    plugin: CoTAPVisionTransformer, exports: dict[str, str]
) -> None:
    from lightly_cotap.export import build_model_from_checkpoint, load_backbone

    x = _images()
    with torch.no_grad():
        ref = plugin(x).dense
    for model in (
        load_backbone(exports["mmseg"]),
        build_model_from_checkpoint(exports["mmseg"]),  # what `eval` uses
        build_model_from_checkpoint(exports["mmseg"], prefix="backbone.model.vit."),
    ):
        assert model.get_meta() == plugin.get_meta()
        with torch.no_grad():
            assert torch.equal(model(x).dense, ref)


def test_mmpretrain_prefix_and_stock_mmengine_loader(
    plugin: CoTAPVisionTransformer, exports: dict[str, str]
) -> None:
    from mmengine.model.weight_init import PretrainedInit
    from mmengine.runner.checkpoint import _load_checkpoint, load_checkpoint

    # torch >= 2.6 loads with weights_only=True by default (mmengine does not pass it)
    checkpoint = _load_checkpoint(exports["mmseg"], map_location="cpu")
    assert checkpoint["meta"]["mmseg_backbone"]["type"] == "CoTAPViT"
    assert all(k.startswith("backbone.model.") for k in checkpoint["state_dict"])

    x = _images()
    with torch.no_grad():
        ref = plugin(x).dense.permute(0, 3, 1, 2)
    # mmpretrain convention: Pretrained(..., prefix='backbone.')
    backbone = MODELS.build(_backbone_cfg())
    backbone.init_cfg = dict(
        type="Pretrained", checkpoint=exports["mmseg"], prefix="backbone."
    )
    backbone.init_weights()
    with torch.no_grad():
        assert (backbone.eval()(x)[-1] - ref).abs().max() <= 1e-5
    # mmengine's stock initialiser (what BaseModule would do) fits the keys too
    stock = _build()
    PretrainedInit(checkpoint=exports["mmseg"], prefix="backbone.")(stock)
    with torch.no_grad():
        assert (stock(x)[-1] - ref).abs().max() <= 1e-5
    # ... and so does `load_from` on the whole segmentor
    segmentor = _segmentor(frozen=False, out_indices=(0, 1, -1))
    load_checkpoint(segmentor, exports["mmseg"], strict=False)
    with torch.no_grad():
        assert (segmentor.backbone.eval()(x)[-1] - ref).abs().max() <= 1e-5


def test_plain_timm_checkpoint_for_baselines(tmp_path: Path) -> None:
    plain = _plugin(use_filter=False, seed=1)
    path = tmp_path / "timm_vit.pth"
    torch.save(plain.vit.state_dict(), path)  # a bare timm / DINO state dict
    backbone = _build(str(path), use_filter=False)
    x = _images()
    with torch.no_grad():
        assert (
            backbone(x)[-1] - plain(x).dense.permute(0, 3, 1, 2)
        ).abs().max() <= 1e-5
    assert backbone.out_channels == [192, 192, 192]


def test_padding_and_other_sizes(plugin: CoTAPVisionTransformer) -> None:
    backbone = _build()
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 50, 61))
    assert [tuple(o.shape[-2:]) for o in outs] == [(7, 8)] * 3


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        _build("/nonexistent/cotap.pth")


def test_checkpoint_of_other_architecture(
    tmp_path: Path, exports: dict[str, str]
) -> None:
    # exported (meta) checkpoint: every differing field, with the key that fixes it
    with pytest.raises(ValueError) as info:
        _build(exports["timm"], arch="vit_small_patch16_224")
    lines = str(info.value).splitlines()
    assert lines[0].startswith(
        f"Checkpoint '{exports['timm']}' holds another architecture than the backbone "
        "configured as CoTAPViT(arch='vit_small_patch16_224', embed_dim=384,"
    )
    assert lines[1:] == [
        "  embed_dim: checkpoint 192, config 384 -> set "
        "model.backbone.timm_kwargs.embed_dim=192",
        "  num_heads: checkpoint 3, config 6 -> set "
        "model.backbone.timm_kwargs.num_heads=3",
        "Set these keys, or model.backbone.arch='auto' to take the whole "
        "architecture from the checkpoint. The decode head on the last level then "
        "needs in_channels=384; heads and necks on earlier levels 192.",
    ]
    with pytest.raises(
        ValueError,
        match=r"  num_prototypes: checkpoint 8, config 16 -> set "
        r"model\.backbone\.num_prototypes=8\n",
    ):
        _build(exports["mmseg"], num_prototypes=16)
    with pytest.raises(
        ValueError,
        match=r"  use_filter: checkpoint True, config False -> set "
        r"model\.backbone\.use_filter=True\n",
    ):
        _build(exports["timm"], use_filter=False)
    with pytest.raises(ValueError) as info:
        _build(exports["timm"], timm_kwargs=dict(reg_tokens=2, qkv_bias=False))
    assert [line for line in str(info.value).splitlines() if line.startswith("  ")] == [
        "  patch_size: checkpoint 8, config 16 -> set "
        "model.backbone.timm_kwargs.patch_size=8",
        "  depth: checkpoint 3, config 12 -> set model.backbone.timm_kwargs.depth=3",
        "  qkv_bias: checkpoint True, config False -> set "
        "model.backbone.timm_kwargs.qkv_bias=True",
        "  num_reg_tokens: checkpoint 0, config 2 -> set "
        "model.backbone.timm_kwargs.reg_tokens=0",
    ]
    # bare state dict: the fields that its tensor shapes reveal
    path = tmp_path / "small.pth"
    small = CoTAPVisionTransformer(
        "vit_small_patch16_224", use_filter=False, img_size=IMG, **TIMM
    )
    torch.save(small.vit.state_dict(), path)
    with pytest.raises(ValueError) as info:
        _build(str(path), use_filter=False)
    assert str(info.value).splitlines()[1:] == [
        "  embed_dim: checkpoint 384, config 192 -> set "
        "model.backbone.timm_kwargs.embed_dim=384",
        "Set these keys.",
    ]


def test_arch_auto_takes_the_architecture_from_the_export(
    plugin: CoTAPVisionTransformer, exports: dict[str, str]
) -> None:
    x = _images()
    with torch.no_grad():
        ref = plugin(x).dense.permute(0, 3, 1, 2)
    for fmt in ("timm", "mmseg"):
        backbone = MODELS.build(
            dict(
                type="CoTAPViT",
                arch="auto",
                img_size=IMG,
                out_indices=(0, -1),
                init_cfg=dict(type="Pretrained", checkpoint=exports[fmt]),
            )
        )
        backbone.init_weights()
        assert backbone.arch == ARCH and backbone.out_channels == [192, 384]
        with torch.no_grad():
            assert (backbone.eval()(x)[-1] - ref).abs().max() <= 1e-5
    # explicit settings must agree with the checkpoint
    with pytest.raises(ValueError, match="num_prototypes: checkpoint 8, config 4 "):
        MODELS.build(
            dict(
                type="CoTAPViT",
                arch="auto",
                num_prototypes=4,
                init_cfg=dict(type="Pretrained", checkpoint=exports["timm"]),
            )
        ).init_weights()


@pytest.mark.parametrize(
    "structure",
    [
        dict(patch_size=8, embed_dim=96, depth=4, num_heads=3),  # the train demo
        dict(depth=2, reg_tokens=4, no_embed_class=True, init_values=1e-5),
        dict(depth=2, qkv_bias=False, mlp_ratio=2.0),
        dict(depth=2, patch_size=8, conv_stem=True),
    ],
)
def test_export_meta_rebuilds_the_backbone_exactly(
    tmp_path: Path, structure: dict[str, Any]
) -> None:
    from lightly_cotap.mmseg import export_mmseg_checkpoint

    torch.manual_seed(0)
    model = CoTAPVisionTransformer(ARCH, img_size=IMG, num_prototypes=5, **structure)
    path = tmp_path / "mmseg.pth"
    export_mmseg_checkpoint(model, path)
    meta = torch.load(path, weights_only=True)["meta"]
    cfg = meta["mmseg_backbone"]
    assert cfg["arch"] == ARCH and cfg["img_size"] == (IMG, IMG)
    assert (cfg["num_prototypes"], cfg["use_filter"]) == (5, True)
    width = structure.get("embed_dim", 192)
    assert meta["mmseg_in_channels"] == {"last": 2 * width, "intermediate": width}
    assert cfg.get("conv_stem", False) == structure.get("conv_stem", False)
    backbone = MODELS.build(
        dict(cfg, init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    )
    backbone.init_weights()  # strict, architecture checked field by field
    rebuilt, original = backbone.model.get_meta(), model.get_meta()
    assert rebuilt == original
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(
            backbone.eval()(x)[-1],
            model.eval()(x).dense.permute(0, 3, 1, 2),
            rtol=0,
            atol=1e-5,
        )


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="last block"):
        MODELS.build(_backbone_cfg(out_indices=(0, 1)))
    with pytest.raises(ValueError, match="increasing"):
        MODELS.build(_backbone_cfg(out_indices=(1, 0, 2)))
    with pytest.raises(ValueError, match="out_indices"):
        MODELS.build(_backbone_cfg(out_indices=(5,)))
    with pytest.raises(ValueError, match="Pretrained"):
        MODELS.build(_backbone_cfg(init_cfg=dict(type="Kaiming")))
    with pytest.raises(ValueError, match="either pretrained or init_cfg"):
        MODELS.build(_backbone_cfg("a.pth", pretrained="b.pth"))


def _segmentor(frozen: bool, out_indices: Any = (-1,)) -> Any:
    return MODELS.build(
        dict(
            type="EncoderDecoder",
            backbone=_backbone_cfg(frozen=frozen, out_indices=out_indices),
            decode_head=dict(
                type="FCNHead",
                in_channels=384,
                in_index=-1,
                channels=384,
                num_convs=0,
                concat_input=False,
                num_classes=3,
            ),
        )
    )


def test_frozen_backbone() -> None:
    model = _segmentor(frozen=True)
    model.train()
    assert not model.backbone.model.training  # no drop path / dropout
    assert not any(p.requires_grad for p in model.backbone.parameters())
    out = model.backbone(_images())
    assert not out[-1].requires_grad  # no graph through the backbone
    # something re-enables gradients -> the optimiser would update the backbone
    model.backbone.model.vit.blocks[0].attn.qkv.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="requires_grad=True"):
        model.train()


def test_layer_decay_constructor() -> None:
    model = _segmentor(frozen=False)
    constructor = CoTAPLayerDecayOptimWrapperConstructor(
        dict(
            type="OptimWrapper", optimizer=dict(type="AdamW", lr=1.0, weight_decay=0.05)
        ),
        dict(layer_decay_rate=0.5),
    )
    wrapper = constructor(model)
    lrs: dict[int, float] = {}
    for group in wrapper.optimizer.param_groups:
        for param in group["params"]:
            lrs[id(param)] = group["lr"]
    named = dict(model.named_parameters())
    depth = 3
    assert lrs[id(named["backbone.model.vit.pos_embed"])] == 0.5 ** (depth + 1)
    assert lrs[id(named["backbone.model.vit.blocks.0.attn.qkv.weight"])] == 0.5**depth
    assert lrs[id(named["backbone.model.vit.blocks.2.mlp.fc1.weight"])] == 0.5**1
    assert lrs[id(named["backbone.model.filter.norm_in.weight"])] == 0.5**1
    assert lrs[id(named["decode_head.conv_seg.weight"])] == 1.0
    # mmengine logs the lr of the first group: the base rate
    assert wrapper.get_lr()["lr"][0] == 1.0
    group_lrs = [g["lr"] for g in wrapper.optimizer.param_groups]
    assert group_lrs == sorted(group_lrs, reverse=True)
    # parameters segmentation cannot train are not in the optimiser
    assert id(named["backbone.model.filter.prototypes"]) not in lrs
    decay = {
        id(p): g["weight_decay"]
        for g in wrapper.optimizer.param_groups
        for p in g["params"]
    }
    assert decay[id(named["backbone.model.vit.blocks.0.attn.qkv.bias"])] == 0.0
    assert decay[id(named["backbone.model.vit.blocks.0.attn.qkv.weight"])] == 0.05

    with pytest.raises(ValueError, match="frozen"):
        constructor(_segmentor(frozen=True))
    with pytest.raises(ValueError, match="extra keys"):
        CoTAPLayerDecayOptimWrapperConstructor(
            dict(optimizer=dict(type="AdamW", lr=1.0)), dict(custom_keys={})
        )


class _DecayEverything(torch.optim.Optimizer):
    """Buggy optimiser: weight decay on every parameter, with or without grad."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                param.mul_(1 - group["lr"])


def test_frozen_check_hook_catches_optimiser_updating_backbone() -> None:
    model = _segmentor(frozen=True)
    wrapper = OPTIM_WRAPPERS.build(
        dict(type="OptimWrapper", optimizer=_DecayEverything(model.parameters()))
    )
    runner = SimpleNamespace(model=model, optim_wrapper=wrapper)
    hook = FrozenBackboneCheckHook()
    hook.before_train(runner)
    wrapper.step()
    with pytest.raises(RuntimeError, match="_DecayEverything"):
        hook.after_train_iter(runner, 0)

    # a well-behaved optimiser passes
    model = _segmentor(frozen=True)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    runner = SimpleNamespace(
        model=model,
        optim_wrapper=OPTIM_WRAPPERS.build(dict(type="OptimWrapper", optimizer=sgd)),
    )
    hook = FrozenBackboneCheckHook()
    hook.before_train(runner)
    model.train()
    loss = model.decode_head(model.backbone(_images())).square().mean()
    loss.backward()
    sgd.step()
    hook.after_train_iter(runner, 0)
    hook.after_train(runner)

    # unfrozen parameters are reported before training starts
    model.backbone.model.vit.cls_token.requires_grad_(True)
    with pytest.raises(RuntimeError, match="cls_token"):
        FrozenBackboneCheckHook().before_train(runner)
