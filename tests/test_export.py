from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from lightly_cotap.export import (
    build_model_from_checkpoint,
    export_backbone,
    export_state_dict,
    load_backbone,
    main,
)
from lightly_cotap.models import CoTAPVisionTransformer


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _trained_like(model: CoTAPVisionTransformer) -> CoTAPVisionTransformer:
    """Perturbs all weights (incl. norms and prototypes) so nothing is at its init."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if model.filter is not None:
        model.filter.set_prototypes(torch.randn_like(model.filter.prototypes))
    return model.eval()


def _max_abs_diff(a: CoTAPVisionTransformer, b: CoTAPVisionTransformer) -> float:
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        out_a = a(x, return_fg_mask=True)
        out_b = b(x, return_fg_mask=True)
    assert out_a.fg_mask is not None and out_b.fg_mask is not None
    assert torch.equal(out_a.fg_mask, out_b.fg_mask)
    return max(
        float((out_a.cls - out_b.cls).abs().max()),
        float((out_a.dense - out_b.dense).abs().max()),
    )


@pytest.mark.parametrize("use_filter", [True, False])
def test_round_trip_timm_name(
    tmp_path: Path, use_filter: bool, no_network: None
) -> None:
    torch.manual_seed(0)
    model = _trained_like(
        CoTAPVisionTransformer(
            "vit_tiny_patch16_224",
            img_size=96,
            depth=2,
            use_filter=use_filter,
            num_prototypes=8,
        )
    )
    path = tmp_path / "backbone.pth"
    export_backbone(model, path)
    loaded = load_backbone(path)
    assert loaded.arch == "vit_tiny_patch16_224"
    assert loaded.use_filter == use_filter and loaded.out_dim == model.out_dim
    assert _max_abs_diff(model, loaded) == 0.0
    if use_filter:
        assert loaded.prototypes_initialized
        assert torch.equal(loaded.prototypes, model.prototypes)


def test_round_trip_non_default_mlp_ratio_and_qkv_bias(tmp_path: Path) -> None:
    model = _trained_like(
        CoTAPVisionTransformer(
            "vit_tiny_patch16_224", img_size=32, depth=2, mlp_ratio=2.0, qkv_bias=False
        )
    )
    export_backbone(model, tmp_path / "backbone.pth")
    loaded = load_backbone(tmp_path / "backbone.pth")
    assert loaded.get_meta() == model.get_meta()
    assert _max_abs_diff(model, loaded) == 0.0


def test_round_trip_custom_vit_with_registers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=48,
        patch_size=8,
        embed_dim=48,
        depth=2,
        num_heads=3,
        reg_tokens=2,
        no_embed_class=True,
        init_values=1e-5,
        qkv_bias=False,
        num_classes=0,
        dynamic_img_size=True,
    )
    model = _trained_like(
        CoTAPVisionTransformer(vit, num_prototypes=5, prototype_size=1)
    )
    meta = model.get_meta()
    assert meta["arch"] is None  # rebuilt from the structure
    path = tmp_path / "custom.pth"
    export_backbone(model, path)
    loaded = CoTAPVisionTransformer.from_checkpoint(path)
    assert loaded.num_prefix_tokens == 3 and loaded.prototype_size == 1
    assert _max_abs_diff(model, loaded) == 0.0


def test_exported_file_format(tmp_path: Path) -> None:
    model = CoTAPVisionTransformer("vit_tiny_patch16_224", img_size=64, depth=2)
    path = tmp_path / "backbone.pth"
    export_backbone(model, path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"meta", "state_dict"}
    keys = set(ckpt["state_dict"])
    assert "patch_embed.proj.weight" in keys and "blocks.1.attn.qkv.weight" in keys
    assert not any(k.startswith("vit.") for k in keys)
    assert "norm.weight" not in keys  # no final norm with the filter
    assert {k for k in keys if k.startswith("filter.")} == {
        "filter.prototypes",
        "filter.prototypes_initialized",
        "filter.norm_in.weight",
        "filter.norm_in.bias",
        "filter.norm_out_patch.weight",
        "filter.norm_out_patch.bias",
        "filter.norm_out_cls.weight",
        "filter.norm_out_cls.bias",
    }
    meta = ckpt["meta"]
    assert meta["arch"] == "vit_tiny_patch16_224"
    assert (meta["embed_dim"], meta["depth"], meta["num_heads"]) == (192, 2, 3)
    assert meta["patch_size"] == 16 and meta["num_reg_tokens"] == 0
    assert meta["use_filter"] is True
    assert (meta["num_prototypes"], meta["prototype_size"]) == (64, 3)
    assert meta["out_dim"] == 384 and meta["img_size"] == [64, 64]
    # The timm keys load into a plain timm ViT (the filter keys are extra).
    vit = VisionTransformer(
        img_size=64, patch_size=16, embed_dim=192, depth=2, num_heads=3, num_classes=0
    )
    result = vit.load_state_dict(ckpt["state_dict"], strict=False)
    assert set(result.missing_keys) == {"norm.weight", "norm.bias"}
    assert set(result.unexpected_keys) == {k for k in keys if k.startswith("filter.")}


def test_cli_converts_lightning_checkpoint(tmp_path: Path, no_network: None) -> None:
    torch.manual_seed(0)
    # Full depth: the CLI builds the named architecture as is.
    student = _trained_like(
        CoTAPVisionTransformer("vit_tiny_patch16_224", img_size=64, num_prototypes=6)
    )
    teacher = CoTAPVisionTransformer("vit_tiny_patch16_224", img_size=64)
    state = {"student_backbone." + k: v for k, v in student.state_dict().items()}
    state.update({"teacher_backbone." + k: v for k, v in teacher.state_dict().items()})
    ckpt_path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "epoch": 1}, ckpt_path)
    out_path = tmp_path / "exported.pth"
    code = main(
        [
            "--checkpoint",
            str(ckpt_path),
            "--output",
            str(out_path),
            "--arch",
            "vit_tiny_patch16_224",
            "--img-size",
            "64",
        ]
    )
    assert code == 0
    loaded = load_backbone(out_path)
    assert loaded.num_prototypes == 6  # read from the checkpoint's prototypes
    assert _max_abs_diff(student, loaded) == 0.0
    # Re-exporting an export needs no architecture arguments.
    again = tmp_path / "again.pth"
    assert main(["--checkpoint", str(out_path), "--output", str(again)]) == 0
    assert _max_abs_diff(student, load_backbone(again)) == 0.0


def _cotap_module_checkpoint(path: Path, img_size: int) -> CoTAPVisionTransformer:
    """Writes a CoTAPModule checkpoint in Lightning's layout (weights +
    ``save_hyperparameters()``) and returns its student backbone.
    """
    from lightly_cotap.train import CoTAPModule

    torch.manual_seed(0)
    module = CoTAPModule(
        "vit_tiny_patch16_224",
        backbone_kwargs=dict(img_size=img_size, patch_size=8, depth=2, embed_dim=48),
        num_prototypes=5,
        head_hidden_dim=16,
        head_bottleneck_dim=8,
        patch_prototypes=8,
        cls_prototypes=8,
        max_steps=1,
    )
    student: CoTAPVisionTransformer = module.student.backbone
    _trained_like(student)
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)},
        path,
    )
    return student


def test_cotap_module_checkpoint_needs_no_arch(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    student = _cotap_module_checkpoint(path, img_size=32)
    model = build_model_from_checkpoint(path, img_size=48)
    assert (model.patch_size, len(model.vit.blocks), model.num_prototypes) == (8, 2, 5)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = student.eval()(x).dense
        torch.testing.assert_close(model(x).dense, expected)


def test_cli_needs_arch_without_meta(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = CoTAPVisionTransformer("vit_tiny_patch16_224", img_size=64, depth=2)
    path = tmp_path / "plain.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", str(path), "--output", str(tmp_path / "x.pth")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --checkpoint: '{path}': neither a lightly-cotap export" in err
    assert "--arch" in err and "Traceback" not in err


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="CoTAPVisionTransformer"):
        export_state_dict(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    path = tmp_path / "nometa.pth"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="no 'meta'"):
        load_backbone(path)
    # A checkpoint of another architecture does not load into a model.
    small = CoTAPVisionTransformer("vit_tiny_patch16_224", img_size=64, depth=2)
    export_backbone(small, tmp_path / "tiny.pth")
    other = CoTAPVisionTransformer(
        "vit_tiny_patch16_224", img_size=64, depth=2, embed_dim=96, num_heads=3
    )
    with pytest.raises(
        ValueError, match=r"checkpoint shape \(1, 1, 192\) vs model shape \(1, 1, 96\)"
    ):
        other.load_pretrained(tmp_path / "tiny.pth")


@pytest.mark.parametrize(
    "case, message",
    [
        ("text", "--checkpoint: '{path}': not a PyTorch checkpoint"),
        ("truncated", "--checkpoint: '{path}': truncated or damaged"),
        ("empty", "--checkpoint: '{path}': empty file (0 bytes)"),
        ("missing", "--checkpoint: '{path}': no such file"),
        ("pickled_object", "if you trust its source, pass --unsafe-load"),
        ("resnet", "--arch: 'resnet50': is not a timm VisionTransformer"),
        ("other_architecture", "Checkpoint does not fit the model architecture"),
        ("output_folder", "--output: '{out}': is a folder"),
    ],
)
def test_cli_user_errors_are_one_line(
    case: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = CoTAPVisionTransformer("vit_tiny_patch16_224", img_size=32, depth=1)
    path = tmp_path / "in.pth"
    out = tmp_path / "out.pth"
    export_backbone(model, path)
    extra: list[str] = []
    if case == "text":
        path.write_text("not a checkpoint")
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "missing":
        path = tmp_path / "missing.pth"
    elif case == "pickled_object":
        torch.save({"state_dict": {}, "obj": _Opaque()}, path)
    elif case == "resnet":
        extra = ["--arch", "resnet50"]
    elif case == "other_architecture":
        torch.save(model.vit.state_dict(), path)
        extra = ["--arch", "vit_small_patch16_224"]
    elif case == "output_folder":
        out = tmp_path
    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", str(path), "--output", str(out), *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1
    assert lines[0].startswith("python -m lightly_cotap.export: error: ")
    assert message.format(path=path, out=out) in lines[0]
    assert "Traceback" not in err and "PytorchStreamReader" not in err
    if case == "other_architecture":
        assert lines[0].endswith("; pass the --arch (timm name) it was trained with")
    if case in ("text", "truncated", "empty"):
        assert "weights_only" not in err and "unsafe" not in err
    if case != "output_folder":
        assert not out.exists()
    # --debug shows the traceback of the same error.
    with pytest.raises(ValueError):
        main(["--checkpoint", str(path), "--output", str(out), *extra, "--debug"])


class _Opaque:
    pass


def test_export_keeps_the_trained_position_embedding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a train checkpoint: the grid of its hyper-parameters (32 px / 8 = 4 x 4)
    student = _cotap_module_checkpoint(tmp_path / "last.ckpt", img_size=32)
    out = tmp_path / "backbone.pth"
    assert (
        main(["--checkpoint", str(tmp_path / "last.ckpt"), "--output", str(out)]) == 0
    )
    exported = torch.load(out, weights_only=True)
    assert exported["meta"]["img_size"] == [32, 32]
    assert torch.equal(exported["state_dict"]["pos_embed"], student.vit.pos_embed)
    assert "resampled: []" in capsys.readouterr().err
    # a bare timm state dict: the grid of its pos_embed
    plain = CoTAPVisionTransformer(
        "vit_tiny_patch16_224", use_filter=False, img_size=48
    )
    torch.save(plain.vit.state_dict(), tmp_path / "plain.pth")
    args = [
        "--checkpoint",
        str(tmp_path / "plain.pth"),
        "--arch",
        "vit_tiny_patch16_224",
    ]
    assert main([*args, "--output", str(out)]) == 0
    exported = torch.load(out, weights_only=True)
    assert exported["meta"]["img_size"] == [48, 48]
    assert torch.equal(exported["state_dict"]["pos_embed"], plain.vit.pos_embed)
    capsys.readouterr()
    # another grid only when asked for, and the report says from / to
    assert main([*args, "--img-size", "64", "--output", str(out)]) == 0
    assert torch.load(out, weights_only=True)["meta"]["img_size"] == [64, 64]
    assert (
        "  pos_embed resampled from the checkpoint's 3x3 patch grid to 4x4 (bicubic, "
        "timm's resample_abs_pos_embed)"
    ) in capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(
    ("arch", "structure", "overrides"),
    [
        (
            "vit_tiny_patch16_224",
            dict(patch_size=8, embed_dim=96, depth=4, num_heads=3),
            dict(patch_size=8, embed_dim=96, depth=4),  # 3 heads: tiny's default
        ),
        (
            "vit_small_patch16_224",
            dict(depth=2, reg_tokens=4, no_embed_class=True, init_values=1e-5),
            dict(depth=2, reg_tokens=4, no_embed_class=True, init_values=1e-5),
        ),
        ("vit_small_patch16_224", dict(), dict()),
    ],
)
def test_timm_overrides_rebuild_the_architecture(
    arch: str, structure: dict[str, Any], overrides: dict[str, Any]
) -> None:
    from lightly_cotap.models.cotap_vit_meta import timm_overrides

    meta = CoTAPVisionTransformer(arch, img_size=32, **structure).get_meta()
    assert timm_overrides(meta) == overrides
    rebuilt = CoTAPVisionTransformer(arch, img_size=32, **timm_overrides(meta))
    assert rebuilt.get_meta() == meta


def test_timm_overrides_of_an_unnamed_vit() -> None:
    from lightly_cotap.models.cotap_vit_meta import GENERIC_ARCH, timm_overrides

    vit = VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=2,
        num_heads=3,
        num_classes=0,
        dynamic_img_size=True,
    )
    meta = CoTAPVisionTransformer(vit).get_meta()
    assert meta["arch"] is None
    overrides = timm_overrides(meta)
    assert overrides == dict(patch_size=8, embed_dim=48, depth=2, num_heads=3)
    rebuilt = CoTAPVisionTransformer(GENERIC_ARCH, img_size=32, **overrides)
    assert {k: v for k, v in rebuilt.get_meta().items() if k != "arch"} == {
        k: v for k, v in meta.items() if k != "arch"
    }
