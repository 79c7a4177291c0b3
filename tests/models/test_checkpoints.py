from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from lightly_cotap.models import CoTAPVisionTransformer
from lightly_cotap.models.checkpoint_files import (
    CheckpointFileError,
    load_checkpoint_file,
)
from lightly_cotap.models.checkpoints import (
    CheckpointLoadReport,
    CheckpointMismatchError,
    _summarize_keys,
    architecture_from_state_dict,
    extract_backbone_state_dict,
    load_backbone_state_dict,
)


def _vit(
    img_size: int | tuple[int, int] = 32, seed: int = 0, **timm_kwargs: Any
) -> VisionTransformer:
    """A small timm ViT (48 wide, 2 blocks, 8 px patches) unless ``timm_kwargs`` say
    otherwise.
    """
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {
        "patch_size": 8,
        "embed_dim": 48,
        "depth": 2,
        "num_heads": 3,
        "num_classes": 0,
        "dynamic_img_size": True,
    }
    return VisionTransformer(img_size=img_size, **{**kwargs, **timm_kwargs})


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


#: The final norm of a timm ViT, which a model with the object-aware filter drops.
_FINAL_NORM = ("norm.weight", "norm.bias")


def _assert_vit_equal(
    model: CoTAPVisionTransformer,
    state: dict[str, Tensor],
    not_in_model: tuple[str, ...] = (),
) -> None:
    """Every key of ``state`` holds its value in ``model.vit``, except ``not_in_model``
    (keys the model has no place for, e.g. the final norm it drops).
    """
    model_state = model.state_dict()
    for key, value in state.items():
        if key in not_in_model:
            assert "vit." + key not in model_state, key
        else:
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
        _assert_vit_equal(model, state, _FINAL_NORM)

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
        _assert_vit_equal(model, teacher, _FINAL_NORM)
        assert "teacher:head.mlp.0.weight" in report.ignored_keys
        for key in ("student", "optimizer", "epoch", "args"):
            assert key in report.ignored_keys
        # Choosing the student explicitly.
        report = model.load_pretrained(path, checkpoint_key="student")
        assert report.prefix == "student:module.backbone."
        _assert_vit_equal(model, student, _FINAL_NORM)

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
        _assert_vit_equal(model, student, _FINAL_NORM)
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


def _grid_reference(
    value: Tensor, num_prefix: int, old: int, new: tuple[int, int]
) -> Tensor:
    """Bicubic, antialiased resampling of the patch part of a position embedding in
    float64, prefix tokens (CLS, registers) kept as they are.
    """
    prefix, grid = value[:, :num_prefix], value[:, num_prefix:].double()
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid, size=new, mode="bicubic", antialias=True, align_corners=False
    )
    grid = grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)
    return torch.cat([prefix.double(), grid], dim=1)


class TestPosEmbedResampling:
    @pytest.mark.parametrize(
        "vit_kwargs, num_prefix",
        [
            ({}, 1),
            ({"reg_tokens": 2}, 3),  # CLS + registers keep their embeddings
            ({"reg_tokens": 2, "no_embed_class": True}, 0),  # no prefix in pos_embed
        ],
    )
    @pytest.mark.parametrize(
        "old_img, new_img", [(64, (32, 48)), (16, 32), (8, (16, 24))]
    )
    def test_value_matches_interpolation_and_timm(
        self,
        vit_kwargs: dict[str, Any],
        num_prefix: int,
        old_img: int,
        new_img: int | tuple[int, int],
    ) -> None:
        source = _model(img_size=old_img, seed=1, **vit_kwargs)
        with torch.no_grad():
            source.vit.pos_embed.normal_()
        value = source.vit.pos_embed.detach().clone()
        model = _model(img_size=new_img, **vit_kwargs)
        report = model.load_pretrained(source.state_dict())

        old = old_img // 8
        new_h, new_w = (new_img, new_img) if isinstance(new_img, int) else new_img
        new = (new_h // 8, new_w // 8)
        assert report.resampled_keys == ["pos_embed"]
        assert report.resampled_grids == {"pos_embed": ((old, old), new)}
        loaded = model.vit.pos_embed.detach()
        torch.testing.assert_close(
            loaded.double(),
            _grid_reference(value, num_prefix, old, new),
            rtol=0,
            atol=1e-5,
        )
        timm_value = resample_abs_pos_embed(
            value, new_size=list(new), old_size=[old, old], num_prefix_tokens=num_prefix
        )
        assert torch.equal(loaded, timm_value)
        # Everything else is loaded as it is.
        for key, tensor in source.state_dict().items():
            if key != "vit.pos_embed":
                assert torch.equal(model.state_dict()[key], tensor), key

    def test_timm_is_not_asked_to_log(self, caplog: pytest.LogCaptureFixture) -> None:
        # The report's resample_note says what was resampled; no extra log line.
        with caplog.at_level(logging.DEBUG):
            report = _model(img_size=32).load_pretrained(
                _model(img_size=64).state_dict()
            )
        assert report.resampled_keys == ["pos_embed"]
        assert caplog.records == []

    def test_resampling_can_be_turned_off(self) -> None:
        with pytest.raises(
            CheckpointMismatchError,
            match=r"pos_embed: checkpoint shape \(1, 65, 48\) vs model shape \(1, 17, 48\)",
        ):
            load_backbone_state_dict(
                _model(img_size=32),
                _model(img_size=64).state_dict(),
                resample_pos_embed=False,
            )

    def test_unresamplable_embeddings_are_mismatches(self) -> None:
        # Another number of registers: the pos_embed's patch part is no square grid,
        # and reg_token (3-d, same width) is not a position embedding.
        with pytest.raises(CheckpointMismatchError) as info:
            _model(img_size=32, reg_tokens=4).load_pretrained(
                _model(img_size=32, reg_tokens=2).state_dict()
            )
        message = str(info.value)
        assert "pos_embed: checkpoint shape (1, 19, 48) vs model shape (1, 21, 48)" in (
            message
        )
        assert "reg_token: checkpoint shape (1, 2, 48) vs model shape (1, 4, 48)" in (
            message
        )

    @pytest.mark.parametrize("tokens", [1, 3])
    def test_embedding_without_patch_tokens_is_a_mismatch(self, tokens: int) -> None:
        # A position embedding holding no more tokens than the model's prefix (CLS +
        # 2 registers) has no patch grid to resample.
        state = _model(img_size=32, reg_tokens=2).state_dict()
        state["vit.pos_embed"] = state["vit.pos_embed"][:, :tokens]
        with pytest.raises(
            CheckpointMismatchError,
            match=rf"pos_embed: checkpoint shape \(1, {tokens}, 48\) vs model shape",
        ):
            _model(img_size=32, reg_tokens=2).load_pretrained(state)


class TestReport:
    def test_summary_and_resample_note(self) -> None:
        ignored = {f"teacher:k{i}": "outside" for i in range(6)}
        ignored["norm.weight"] = "final norm"
        report = CheckpointLoadReport(
            prefix="state_dict:net.",
            loaded_keys=["vit.a", "vit.b"],
            missing_keys=["filter.prototypes"],
            unexpected_keys=["extra"],
            ignored_keys=ignored,
            resampled_keys=["pos_embed"],
            resampled_grids={"pos_embed": ((8, 8), (4, 6))},
        )
        note = (
            "pos_embed resampled from the checkpoint's 8x8 patch grid to 4x6 "
            "(bicubic, timm's resample_abs_pos_embed)"
        )
        assert report.resample_note() == note
        assert report.summary().split("\n") == [
            "prefix: 'state_dict:net.'",
            "loaded: 2 keys",
            "missing: ['filter.prototypes']",
            "unexpected: ['extra']",
            "resampled: ['pos_embed']",
            f"  {note}",
            "ignored: 7 keys",
            "  6 x outside: teacher:k0, teacher:k1, teacher:k2, teacher:k3, "
            "teacher:k4, ...",
            "  1 x final norm: norm.weight",
        ]

    def test_notes_of_several_keys_and_of_none(self) -> None:
        report = CheckpointLoadReport(
            resampled_grids={"a": ((2, 4), (3, 3)), "b": ((5, 5), (1, 7))}
        )
        assert report.resample_note() == (
            "a resampled from the checkpoint's 2x4 patch grid to 3x3; "
            "b resampled from the checkpoint's 5x5 patch grid to 1x7 "
            "(bicubic, timm's resample_abs_pos_embed)"
        )
        empty = CheckpointLoadReport()
        assert empty.resample_note() is None
        assert empty.summary().split("\n") == [
            "prefix: ''",
            "loaded: 0 keys",
            "missing: []",
            "unexpected: []",
            "resampled: []",
            "ignored: 0 keys",
        ]
        five = CheckpointLoadReport(ignored_keys={f"k{i}": "r" for i in range(5)})
        assert five.summary().split("\n")[-1] == "  5 x r: k0, k1, k2, k3, k4"

    def test_loaded_keys_and_grids_of_a_load(self) -> None:
        model = _model(img_size=32)
        report = load_backbone_state_dict(model, _model(img_size=64).state_dict())
        assert report.loaded_keys == sorted(model.state_dict())
        assert report.missing_keys == [] and report.unexpected_keys == []
        assert report.resampled_grids == {"pos_embed": ((8, 8), (4, 4))}
        assert report.summary().split("\n")[5] == f"  {report.resample_note()}"


def test_summarize_keys_collapses_blocks_with_more_than_three_keys() -> None:
    keys = ["cls_token"]
    keys += [f"blocks.1.{n}" for n in "abc"]  # 3 keys: listed
    keys += [f"blocks.10.{n}" for n in "abcd"]  # 4 keys: collapsed
    keys += ["pos_embed"]
    assert _summarize_keys(keys) == [
        "cls_token",
        "blocks.1.a",
        "blocks.1.b",
        "blocks.1.c",
        "blocks.10.* (4 keys)",
        "pos_embed",
    ]
    assert _summarize_keys(keys, max_block_keys=4) == keys


class TestArchitectureFromStateDict:
    @pytest.mark.parametrize(
        "vit_kwargs, use_filter",
        [
            ({}, True),
            ({}, False),
            (
                {
                    "patch_size": 4,
                    "depth": 3,
                    "mlp_ratio": 2.5,
                    "qkv_bias": False,
                    "reg_tokens": 2,
                    "init_values": 1e-5,
                },
                True,
            ),
        ],
    )
    def test_fields_equal_the_model_meta(
        self, vit_kwargs: dict[str, Any], use_filter: bool
    ) -> None:
        kwargs = {"patch_size": 8, "depth": 2, **vit_kwargs}
        vit = _vit(**kwargs)
        model = CoTAPVisionTransformer(
            vit, use_filter=use_filter, num_prototypes=5, prototype_size=3
        )
        state, _, _ = extract_backbone_state_dict(model.state_dict())
        fields = architecture_from_state_dict(state)
        shape_fields = {
            "embed_dim",
            "patch_size",
            "depth",
            "mlp_ratio",
            "qkv_bias",
            "layer_scale",
            "num_reg_tokens",
        }
        if use_filter:
            shape_fields |= {"use_filter", "num_prototypes", "prototype_size"}
        assert set(fields) == shape_fields
        meta = model.get_meta()
        assert fields == {key: meta[key] for key in shape_fields}
        assert fields["depth"] == kwargs["depth"]
        assert fields["patch_size"] == kwargs["patch_size"]
        assert fields["num_reg_tokens"] == vit_kwargs.get("reg_tokens", 0)
        assert fields["layer_scale"] == ("init_values" in vit_kwargs)

    def test_partial_state_dicts(self) -> None:
        assert architecture_from_state_dict({}) == {}
        # A flattened (linear) patch projection is no ViT patch embedding.
        flat = {"patch_embed.proj.weight": torch.zeros(48, 3 * 8 * 8)}
        assert architecture_from_state_dict(flat) == {}
        proj = {"patch_embed.proj.weight": torch.zeros(48, 3, 16, 16)}
        assert architecture_from_state_dict(proj) == {
            "embed_dim": 48,
            "patch_size": 16,
            "num_reg_tokens": 0,
        }
        # Prototypes that are not (M, D, k, k) do not make a filter.
        flat_prototypes = {**proj, "filter.prototypes": torch.zeros(4, 48 * 9)}
        assert "use_filter" not in architecture_from_state_dict(flat_prototypes)


class TestSelection:
    @pytest.mark.parametrize("key", ["state_dict", "teacher", "model", "module"])
    def test_known_sub_dicts(self, key: str) -> None:
        state = _timm_state(seed=1)
        checkpoint = {key: {**state, "step": 7}, "epoch": 3, "optimizer": {"lr": 0.1}}
        out, ignored, prefix = extract_backbone_state_dict(checkpoint)
        assert prefix == f"{key}:"
        assert set(out) == set(state)
        assert ignored == {
            f"{key}:step": "not a tensor",
            "epoch": f"top-level entry other than {key!r}",
            "optimizer": f"top-level entry other than {key!r}",
        }

    @pytest.mark.parametrize(
        "prefixes, chosen",
        [
            # lightly's momentum models: one student among two non-teachers.
            (["backbone_momentum.", "student_backbone."], "student_backbone."),
            # No student: the only prefix without "teacher".
            (["backbone.", "teacher_backbone."], "backbone."),
            (["net_teacher.model.", "net.model."], "net.model."),
        ],
    )
    def test_student_or_only_non_teacher(
        self, prefixes: list[str], chosen: str
    ) -> None:
        state = {p + k: v for p in prefixes for k, v in _timm_state(seed=1).items()}
        _, ignored, used = extract_backbone_state_dict(state)
        assert used == chosen
        other = next(p for p in prefixes if p != chosen)
        assert (
            ignored[other + "cls_token"] == f"outside the selected backbone {chosen!r}"
        )

    def test_only_a_vit_prefix_takes_the_filter_beside_it(self) -> None:
        # Filter keys next to a backbone that is not a lightly-cotap '<root>vit.'
        # belong to no backbone.
        state = {"net." + k: v for k, v in _timm_state(seed=1).items()}
        state["filter.prototypes"] = torch.zeros(4, 48, 3, 3)
        out, ignored, _ = extract_backbone_state_dict(state)
        assert not any(k.startswith("filter.") for k in out)
        assert ignored["filter.prototypes"] == "outside the selected backbone 'net.'"

    def test_backbone_without_blocks(self) -> None:
        proj = torch.zeros(48, 3, 8, 8)
        out, ignored, prefix = extract_backbone_state_dict(
            {"patch_embed.proj.weight": proj}
        )
        assert out == {"patch_embed.proj.weight": proj}
        assert ignored == {} and prefix == ""

    def test_official_norm_of_other_blocks_reason(self) -> None:
        state = {"net.model." + k: v for k, v in _timm_state(seed=1).items()}
        state["net.model.blocks.0.norm_in.weight"] = torch.ones(48)
        state["net.model.blocks.1.norm_in.weight"] = torch.ones(48)
        out, ignored, _ = extract_backbone_state_dict(state)
        assert ignored == {
            "net.model.blocks.0.norm_in.weight": (
                "official CoTAP filter norm of a block without the filter (unused)"
            )
        }
        assert "filter.norm_in.weight" in out

    def test_stored_uninitialised_prototypes_stay_uninitialised(self) -> None:
        source = _model(seed=1)
        assert not source.prototypes_initialized
        out, _, _ = extract_backbone_state_dict(source.state_dict())
        assert not out["filter.prototypes_initialized"]
        model = _model(seed=2)
        assert model.filter is not None
        model.filter.set_prototypes(torch.randn(4, 48 * 9))
        model.load_pretrained(source.state_dict())
        assert not model.prototypes_initialized


class TestLoadRules:
    def test_strict_by_default(self) -> None:
        state = _timm_state(seed=1)
        del state["cls_token"]
        with pytest.raises(CheckpointMismatchError, match="cls_token"):
            load_backbone_state_dict(_model(), state)

    def test_model_without_filter_attribute(self) -> None:
        class VitOnly(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.vit = _vit()

        state = _timm_state(seed=1)
        model = VitOnly()
        report = load_backbone_state_dict(model, state)
        assert report.missing_keys == [] and report.ignored_keys == {}
        for key, value in state.items():
            assert torch.equal(model.vit.state_dict()[key], value), key

    def test_classifier_norms_are_ignored(self) -> None:
        vit = _vit(seed=1, num_classes=5, global_pool="avg", fc_norm=True)
        state = vit.state_dict()
        state["norm.weight"] = torch.ones(48)
        state["norm.bias"] = torch.zeros(48)
        report = _model().load_pretrained(state)
        assert report.ignored_keys == {
            "fc_norm.weight": "pooled-feature norm of the classifier",
            "fc_norm.bias": "pooled-feature norm of the classifier",
            "head.weight": "classifier / projection head",
            "head.bias": "classifier / projection head",
            "norm.weight": "final norm (unused with the object-aware filter)",
            "norm.bias": "final norm (unused with the object-aware filter)",
        }

    def test_every_mismatched_shape_is_named(self) -> None:
        state = _timm_state(seed=1)
        state["blocks.1.mlp.fc2.bias"] = torch.zeros(7)
        state["cls_token"] = torch.zeros(1, 1, 5)
        with pytest.raises(CheckpointMismatchError) as info:
            _model().load_pretrained(state)
        lines = str(info.value).split("\n")[1:]
        assert lines == [
            "  cls_token: checkpoint shape (1, 1, 5) vs model shape (1, 1, 48)",
            "  blocks.1.mlp.fc2.bias: checkpoint shape (7,) vs model shape (48,)",
        ]
