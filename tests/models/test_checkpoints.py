from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from lightly_cotap.models import CoTAPVisionTransformer
from lightly_cotap.models.checkpoint_files import (
    CheckpointFileError,
    load_checkpoint_file,
)
from lightly_cotap.models.checkpoints import (
    extract_backbone_state_dict,
    load_backbone_state_dict,
)


def _vit(
    embed_dim: int = 48, depth: int = 2, img_size: int = 32, seed: int = 0
) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=img_size,
        patch_size=8,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=3,
        num_classes=0,
        dynamic_img_size=True,
    )


def _model(
    use_filter: bool = True, seed: int = 0, **kwargs: Any
) -> CoTAPVisionTransformer:
    return CoTAPVisionTransformer(
        _vit(seed=seed, **kwargs), use_filter=use_filter, num_prototypes=4
    ).eval()


def _timm_state(seed: int, num_classes: int = 0, **kwargs: Any) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    vit = VisionTransformer(
        img_size=kwargs.pop("img_size", 32),
        patch_size=8,
        embed_dim=kwargs.pop("embed_dim", 48),
        depth=kwargs.pop("depth", 2),
        num_heads=3,
        num_classes=num_classes,
    )
    return {k: v.clone() for k, v in vit.state_dict().items()}


def _images() -> Tensor:
    return torch.randn(2, 3, 32, 40)


def _assert_vit_equal(model: CoTAPVisionTransformer, state: dict[str, Tensor]) -> None:
    model_state = model.state_dict()
    for key, value in state.items():
        if ("vit." + key) in model_state:
            assert torch.equal(model_state["vit." + key], value), key


class TestTimmAndDino:
    def test_timm_state_dict_without_filter(self) -> None:
        state = _timm_state(seed=1, num_classes=7)
        model = _model(use_filter=False)
        report = model.load_pretrained(state)
        assert report.missing_keys == [] and report.unexpected_keys == []
        assert set(report.ignored_keys) == {"head.weight", "head.bias"}
        assert "classifier" in report.ignored_keys["head.weight"]
        ref = VisionTransformer(
            img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7
        ).eval()
        ref.load_state_dict(state)
        x = torch.randn(2, 3, 32, 32)
        tokens = ref.forward_features(x)
        out = model(x)
        torch.testing.assert_close(out.cls, tokens[:, 0])

    def test_timm_state_dict_with_filter(self) -> None:
        state = _timm_state(seed=1)
        model = _model()
        report = model.load_pretrained(state)  # strict: filter is new, that's fine
        assert set(report.ignored_keys) == {"norm.weight", "norm.bias"}
        assert "final norm" in report.ignored_keys["norm.weight"]
        assert sorted(k for k in report.missing_keys) == sorted(
            k for k in model.state_dict() if k.startswith("filter.")
        )
        assert not model.prototypes_initialized
        _assert_vit_equal(model, state)

    def test_dino_training_checkpoint_file(self, tmp_path: Path) -> None:
        teacher = _timm_state(seed=1)
        student = _timm_state(seed=2)
        ckpt = {
            "teacher": {
                **{"backbone." + k: v for k, v in teacher.items()},
                "head.mlp.0.weight": torch.randn(8, 48),
                "head.last_layer.weight_g": torch.ones(16, 1),
            },
            "student": {"module.backbone." + k: v for k, v in student.items()},
            "optimizer": {"state": {}},
            "epoch": 100,
            "args": argparse.Namespace(arch="vit_small", patch_size=8),
        }
        path = tmp_path / "checkpoint.pth"
        torch.save(ckpt, path)
        model = _model()
        report = model.load_pretrained(path)  # weights_only=True (Namespace allowed)
        assert report.prefix == "teacher:backbone."
        _assert_vit_equal(model, teacher)
        assert "teacher:head.mlp.0.weight" in report.ignored_keys
        for key in ("student", "optimizer", "epoch", "args"):
            assert key in report.ignored_keys
        # Choosing the student explicitly.
        report = model.load_pretrained(path, checkpoint_key="student")
        assert report.prefix == "student:module.backbone."
        _assert_vit_equal(model, student)

    def test_ibot_mask_token_is_ignored(self) -> None:
        state = {"backbone." + k: v for k, v in _timm_state(seed=1).items()}
        state["backbone.masked_embed"] = torch.zeros(1, 48)
        report = _model().load_pretrained({"teacher": state})
        assert report.ignored_keys["masked_embed"] == "iBOT / DINOv2 mask token"

    def test_pos_embed_is_resampled_for_other_image_size(self) -> None:
        state = _timm_state(seed=1, img_size=64)  # 8 x 8 grid
        model = _model(img_size=32)  # 4 x 4 grid
        report = model.load_pretrained(state)
        assert report.resampled_keys == ["pos_embed"]
        assert model.vit.pos_embed.shape == (1, 17, 48)


class TestCoTAPCheckpoints:
    def test_official_cotap_lightning_checkpoint(self) -> None:
        student = _timm_state(seed=1)
        teacher = _timm_state(seed=2)
        kernel = torch.randn(4, 48, 3, 3)
        state: dict[str, Any] = {"net.model." + k: v for k, v in student.items()}
        state.update({"net_teacher.model." + k: v for k, v in teacher.items()})
        state["net.model.kernel"] = kernel
        state["net_teacher.model.kernel"] = torch.zeros(4, 48, 3, 3)
        for block in range(2):
            for name, dim in (
                ("norm_in", 48),
                ("norm_out_patch", 96),
                ("norm_out_cls", 96),
            ):
                for p in ("weight", "bias"):
                    value = torch.full((dim,), float(block + 1))
                    state[f"net.model.blocks.{block}.{name}.{p}"] = value
        state["net.model.projection_heads.0.last_layer.weight_v"] = torch.randn(5, 4)
        model = _model()
        report = model.load_pretrained({"state_dict": state, "epoch": 3})
        assert report.prefix == "state_dict:net.model."
        assert report.missing_keys == [] and report.unexpected_keys == []
        _assert_vit_equal(model, student)
        assert model.filter is not None
        assert torch.equal(model.filter.prototypes, kernel)
        assert model.prototypes_initialized
        # The last block's filter norms are used, the others are reported unused.
        assert (model.filter.norm_in.weight == 2.0).all()
        assert (model.filter.norm_out_patch.bias == 2.0).all()
        assert (
            "unused"
            in report.ignored_keys["state_dict:net.model.blocks.0.norm_in.weight"]
        )
        assert "projection_heads.0.last_layer.weight_v" in report.ignored_keys
        assert "state_dict:net_teacher.model.kernel" in report.ignored_keys

    def test_lightning_checkpoint_of_this_plugin(self) -> None:
        student = _model(seed=1)
        teacher = _model(seed=2)
        assert student.filter is not None
        student.filter.set_prototypes(torch.randn(4, 48 * 9))
        state = {"student_backbone." + k: v for k, v in student.state_dict().items()}
        state.update(
            {"teacher_backbone." + k: v for k, v in teacher.state_dict().items()}
        )
        state["student_patch_head.layers.0.weight"] = torch.randn(3, 96)
        model = _model(seed=3)
        report = model.load_pretrained(
            {"state_dict": state, "hyper_parameters": {"lr": 0.1}}
        )
        assert report.prefix == "state_dict:student_backbone.vit."
        assert report.missing_keys == [] and report.unexpected_keys == []
        x = _images()
        assert torch.equal(model(x).dense, student(x).dense)
        assert model.prototypes_initialized
        # The teacher explicitly.
        model.load_pretrained({"state_dict": state}, prefix="teacher_backbone.vit.")
        assert torch.equal(model(x).dense, teacher(x).dense)

    def test_plain_model_state_dict(self) -> None:
        source = _model(seed=1)
        model = _model(seed=2)
        model.load_pretrained(source.state_dict())
        x = _images()
        assert torch.equal(model(x).cls, source(x).cls)


class TestErrors:
    def test_other_architecture_shape_mismatch(self) -> None:
        state = _timm_state(seed=1, embed_dim=96)
        with pytest.raises(
            ValueError,
            match=r"cls_token: checkpoint shape \(1, 1, 96\) vs model shape \(1, 1, 48\)",
        ):
            _model().load_pretrained(state)

    def test_prototype_count_mismatch(self) -> None:
        source = CoTAPVisionTransformer(_vit(), num_prototypes=8)
        with pytest.raises(
            ValueError,
            match=r"filter.prototypes: checkpoint shape \(8, 48, 3, 3\) vs model shape \(4, 48, 3, 3\)",
        ):
            _model().load_pretrained(source.state_dict())

    def test_other_depth(self) -> None:
        state = _timm_state(seed=1, depth=3)
        with pytest.raises(
            ValueError, match=r"unexpected in checkpoint: \['blocks.2.\* \(12 keys\)'\]"
        ):
            _model().load_pretrained(state)
        report = _model().load_pretrained(state, strict=False)
        assert "blocks.2.attn.qkv.weight" in report.unexpected_keys

    def test_missing_keys(self) -> None:
        state = _timm_state(seed=1)
        del state["blocks.1.mlp.fc2.bias"]
        with pytest.raises(
            ValueError, match=r"missing in checkpoint: \['blocks.1.mlp.fc2.bias'\]"
        ):
            _model().load_pretrained(state)
        report = _model().load_pretrained(state, strict=False)
        assert "blocks.1.mlp.fc2.bias" in report.missing_keys

    def test_partial_filter_is_an_error(self) -> None:
        state = dict(_model(seed=1).state_dict())
        del state["filter.norm_in.weight"]
        with pytest.raises(ValueError, match="filter.norm_in.weight"):
            _model().load_pretrained(state)

    def test_ambiguous_and_missing_backbones(self) -> None:
        state = {"a." + k: v for k, v in _timm_state(seed=1).items()}
        state.update({"b." + k: v for k, v in _timm_state(seed=2).items()})
        with pytest.raises(
            ValueError, match=r"several ViT backbones with prefixes \['a.', 'b.'\]"
        ):
            extract_backbone_state_dict(state)
        out, _, prefix = extract_backbone_state_dict(state, prefix="b.")
        assert prefix == "b." and "cls_token" in out
        with pytest.raises(ValueError, match="prefix 'c.' does not hold"):
            extract_backbone_state_dict(state, prefix="c.")
        with pytest.raises(ValueError, match="No ViT backbone found"):
            extract_backbone_state_dict({"weight": torch.zeros(1)})
        with pytest.raises(ValueError, match="checkpoint_key 'teacher'"):
            extract_backbone_state_dict(state, checkpoint_key="teacher")

    def test_unsafe_file_needs_opt_in(self, tmp_path: Path) -> None:
        path = tmp_path / "unsafe.ckpt"
        torch.save({"state_dict": _timm_state(seed=1), "obj": _Custom()}, path)
        with pytest.raises(ValueError, match="weights_only=False"):
            load_checkpoint_file(path)
        assert "state_dict" in load_checkpoint_file(path, weights_only=False)
        with pytest.raises(FileNotFoundError):
            load_checkpoint_file(tmp_path / "missing.pth")

    def test_load_into_module_without_vit(self) -> None:
        with pytest.raises(AttributeError):
            load_backbone_state_dict(torch.nn.Linear(2, 2), _timm_state(seed=1))


class _Custom:
    pass


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "empty file (0 bytes)"),
        (b"hello, not a checkpoint", "not a PyTorch checkpoint"),
        (b"PK\x03\x04 cut short", "truncated or damaged"),
    ],
)
def test_unloadable_files_say_what_is_wrong(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = tmp_path / "file.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointFileError) as info:
        load_checkpoint_file(path)
    assert info.value.problem.startswith(problem)
    assert not info.value.needs_unsafe_load
    assert "weights_only" not in str(info.value)


def test_truncated_checkpoint_and_blocked_object(tmp_path: Path) -> None:
    path = tmp_path / "full.pth"
    torch.save({"state_dict": _timm_state(seed=1)}, path)
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointFileError, match="truncated or damaged"):
        load_checkpoint_file(tmp_path / "cut.pth")
    torch.save({"state_dict": {}, "obj": _Custom()}, path)
    with pytest.raises(CheckpointFileError) as info:
        load_checkpoint_file(path)
    assert info.value.needs_unsafe_load and "_Custom" in info.value.problem
