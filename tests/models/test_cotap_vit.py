from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lightly.models.utils import update_momentum
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from lightly_cotap.models import CoTAPVisionTransformer, CoTAPViTOutput
from lightly_cotap.models.foreground import foreground_mask_from_attention
from lightly_cotap.models.modules import (
    CoTAPClsProjectionHead,
    CoTAPPatchProjectionHead,
    PrototypeBank,
)


def _tiny(**kwargs: object) -> CoTAPVisionTransformer:
    torch.manual_seed(0)
    kwargs.setdefault("depth", 2)
    return CoTAPVisionTransformer("vit_tiny_patch16_224", img_size=96, **kwargs)  # type: ignore[arg-type]


def _reg_vit(**kwargs: object) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=64,
        patch_size=8,
        embed_dim=48,
        depth=2,
        num_heads=3,
        reg_tokens=4,
        no_embed_class=True,
        init_values=1e-5,
        num_classes=10,
        dynamic_img_size=True,
        **kwargs,  # type: ignore[arg-type]
    )


class TestShapes:
    @pytest.mark.parametrize("use_filter", [True, False])
    def test_vit_tiny_96(self, use_filter: bool) -> None:
        model = _tiny(use_filter=use_filter)
        d = 192
        assert model.embed_dim == d
        assert model.out_dim == (2 * d if use_filter else d)
        assert model.patch_size == 16 and model.num_prefix_tokens == 1
        out = model(torch.randn(2, 3, 96, 96), return_fg_mask=True)
        assert isinstance(out, CoTAPViTOutput)
        assert out.cls.shape == (2, model.out_dim)
        assert out.dense.shape == (2, 6, 6, model.out_dim)
        assert out.fg_mask is not None and out.fg_mask.shape == (2, 6, 6)
        assert out.fg_mask.dtype == torch.bool
        assert out.cls_attention is not None and out.cls_attention.shape == (2, 36)
        assert out.bank_features is None

    def test_optional_outputs_are_none_by_default(self) -> None:
        out = _tiny()(torch.randn(1, 3, 32, 48))
        assert out.dense.shape == (1, 2, 3, 384)
        assert out.fg_mask is None and out.cls_attention is None
        assert out.bank_features is None

    def test_non_square_images_and_bank_features(self) -> None:
        model = _tiny(prototype_size=3)
        out = model(torch.randn(2, 3, 64, 112), return_bank_features=True)
        assert out.dense.shape == (2, 4, 7, 384)
        assert out.bank_features is not None
        assert out.bank_features.shape == (2, 192 * 9) == (2, model.bank_dim)

    def test_vit_small_patch16_224(self) -> None:
        torch.manual_seed(0)
        model = CoTAPVisionTransformer("vit_small_patch16_224").eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, 224, 224), return_fg_mask=True)
        assert out.cls.shape == (1, 768)
        assert out.dense.shape == (1, 14, 14, 768)
        assert out.fg_mask is not None and out.fg_mask.shape == (1, 14, 14)
        assert model.prototypes.shape == (64, 384, 3, 3)

    def test_register_tokens(self) -> None:
        vit = _reg_vit()
        model = CoTAPVisionTransformer(vit)
        assert model.num_prefix_tokens == 5
        out = model(torch.randn(2, 3, 40, 56), return_fg_mask=True)
        assert out.dense.shape == (2, 5, 7, 96)
        assert out.cls_attention is not None and out.cls_attention.shape == (2, 35)


class TestWiring:
    def test_without_filter_matches_timm_features(self) -> None:
        model = _tiny(use_filter=False).eval()
        x = torch.randn(2, 3, 64, 80)
        out = model(x)
        tokens = model.vit.forward_features(x)  # timm incl. final norm
        torch.testing.assert_close(out.cls, tokens[:, 0])
        expected = tokens[:, 1:].reshape(2, 4, 5, 192)  # channel-last
        torch.testing.assert_close(out.dense, expected)

    def test_filter_applied_to_last_block_output(self) -> None:
        model = CoTAPVisionTransformer(_reg_vit()).eval()
        assert isinstance(model.vit.norm, nn.Identity)  # CoTAP has no final norm
        x = torch.randn(2, 3, 32, 48)
        out = model(x)
        tokens = model.vit.forward_features(x)
        assert model.filter is not None
        cls, dense = model.filter(
            tokens[:, 0], tokens[:, 5:].transpose(1, 2).reshape(2, 48, 4, 6)
        )
        torch.testing.assert_close(out.cls, cls)
        torch.testing.assert_close(out.dense, dense.permute(0, 2, 3, 1))

    def test_bank_features_are_pooled_penultimate_block(self) -> None:
        model = CoTAPVisionTransformer(_reg_vit(), prototype_size=3).eval()
        x = torch.randn(2, 3, 48, 40)
        out = model(x, return_bank_features=True)
        features = model.vit.forward_intermediates(
            x, indices=[0], norm=False, output_fmt="NCHW", intermediates_only=True
        )[0]
        expected = F.adaptive_avg_pool2d(features, (3, 3)).flatten(1)
        assert out.bank_features is not None
        torch.testing.assert_close(out.bank_features, expected)
        assert not out.bank_features.requires_grad

    def test_cls_attention_and_fg_mask(self) -> None:
        model = CoTAPVisionTransformer(_reg_vit()).eval()
        x = torch.randn(2, 3, 40, 40)
        out = model(x, return_fg_mask=True)
        # Independent reference: full attention matrix of the last block.
        captured: list[Tensor] = []
        last = model.vit.blocks[-1]
        handle = last.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
        model.vit.forward_features(x)
        handle.remove()
        h = last.norm1(captured[0])
        qkv = last.attn.qkv(h).reshape(2, h.shape[1], 3, 3, 16).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * 16**-0.5).softmax(-1)
        expected = attn[:, :, 0, 5:].mean(1)
        assert out.cls_attention is not None and out.fg_mask is not None
        torch.testing.assert_close(out.cls_attention, expected)
        assert torch.equal(
            out.fg_mask, foreground_mask_from_attention(expected, grid_size=(5, 5))
        )

    def test_deep_copy_reads_its_own_last_block(self) -> None:
        # An EMA teacher is a deep copy: its mask and bank samples must come from
        # its own blocks, not from the student it was copied from.
        student = CoTAPVisionTransformer(_reg_vit(), prototype_size=3).eval()
        teacher = copy.deepcopy(student)
        with torch.no_grad():
            for p in teacher.vit.blocks[0].parameters():
                p.add_(0.5)
        x = torch.randn(2, 3, 32, 32)
        out = teacher(x, return_fg_mask=True, return_bank_features=True)
        features = teacher.vit.forward_intermediates(
            x, indices=[0], norm=False, output_fmt="NCHW", intermediates_only=True
        )[0]
        expected = F.adaptive_avg_pool2d(features, (3, 3)).flatten(1)
        assert out.bank_features is not None
        torch.testing.assert_close(out.bank_features, expected)
        student_out = student(x, return_bank_features=True)
        assert student_out.bank_features is not None
        assert not torch.allclose(student_out.bank_features, expected)

    def test_gradient_checkpointing_gives_same_output(self) -> None:
        model = _tiny(depth=3).train()
        x = torch.randn(1, 3, 32, 32)
        torch.manual_seed(1)
        a = model(x).dense
        model.vit.set_grad_checkpointing(True)
        torch.manual_seed(1)
        b = model(x).dense
        torch.testing.assert_close(a, b)

    def test_instance_is_prepared(self) -> None:
        # A ViT with a classifier: head removed.
        vit = VisionTransformer(
            img_size=32,
            patch_size=16,
            embed_dim=32,
            depth=1,
            num_heads=2,
            dynamic_img_size=True,
        )
        model = CoTAPVisionTransformer(vit, use_filter=False)
        assert isinstance(model.vit.head, nn.Identity)
        assert model(torch.randn(1, 3, 64, 48)).dense.shape == (1, 4, 3, 32)
        assert not any(k.startswith("vit.head") for k in model.state_dict())


class TestTraining:
    @pytest.mark.parametrize("train_prototypes", [False, True])
    def test_gradient_flow(self, train_prototypes: bool) -> None:
        model = _tiny(train_prototypes=train_prototypes).train()
        patch_head = CoTAPPatchProjectionHead(384, 64, 16, 8)
        cls_head = CoTAPClsProjectionHead(384, 64, 16, 8)
        out = model(torch.randn(2, 3, 32, 32))
        loss = patch_head(out.dense).square().mean()
        loss = loss + cls_head(out.cls).square().mean()
        loss.backward()
        params = dict(model.named_parameters())
        for name in (
            "vit.patch_embed.proj.weight",
            "vit.pos_embed",
            "vit.blocks.0.attn.qkv.weight",
            "vit.blocks.1.mlp.fc1.weight",
            "filter.norm_in.weight",
            "filter.norm_out_patch.weight",
            "filter.norm_out_cls.weight",
        ):
            grad = params[name].grad
            assert grad is not None and grad.abs().sum() > 0, name
        for head in (patch_head, cls_head):
            assert head.layers[0].weight.grad is not None
        grad = params["filter.prototypes"].grad
        if train_prototypes:
            assert grad is not None and grad.abs().sum() > 0
        else:
            assert grad is None

    def test_ema_teacher(self) -> None:
        student = _tiny()
        teacher = copy.deepcopy(student)
        assert teacher.filter is not None
        assert teacher.filter.block is teacher.vit.blocks[-1]
        assert teacher.filter.block is not student.vit.blocks[-1]
        x = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(teacher(x).dense, student(x).dense)
        for p in student.parameters():
            p.data.add_(0.1)
        update_momentum(student, teacher, m=0.0)
        torch.testing.assert_close(teacher(x).dense, student(x).dense)
        old = teacher.prototypes.detach().clone()
        with torch.no_grad():
            student.prototypes.add_(1.0)
        update_momentum(student, teacher, m=0.75)
        torch.testing.assert_close(teacher.prototypes, old + 0.25)

    def test_prototype_initialisation_from_bank(self) -> None:
        model = _tiny(num_prototypes=4)
        assert not model.prototypes_initialized
        bank = PrototypeBank(num_samples=8, dim=model.bank_dim)
        while not bank.is_full:
            out = model(torch.randn(3, 3, 48, 48), return_bank_features=True)
            assert out.bank_features is not None
            bank.update(out.bank_features)
        model.init_prototypes_from_bank(
            bank.samples, generator=torch.Generator().manual_seed(0)
        )
        assert model.prototypes_initialized
        flat = model.prototypes.detach().flatten(1)
        torch.testing.assert_close(flat.norm(dim=1), torch.ones(4))
        # Every prototype is the (normalised) mean of some bank samples.
        sims = flat @ F.normalize(bank.samples, dim=1).T
        assert (sims.max(dim=1).values > 0.5).all()
        with pytest.raises(ValueError, match="samples must have shape"):
            model.init_prototypes_from_bank(torch.randn(8, 5))
        with pytest.raises(ValueError, match="at least num_prototypes"):
            model.init_prototypes_from_bank(torch.randn(3, model.bank_dim))


class TestErrors:
    def test_image_size_not_divisible(self) -> None:
        with pytest.raises(ValueError, match=r"not divisible by the patch size 16"):
            _tiny()(torch.randn(1, 3, 96, 100))

    def test_wrong_channels(self) -> None:
        with pytest.raises(ValueError, match=r"3 channels.*\(1, 1, 96, 96\)"):
            _tiny()(torch.randn(1, 1, 96, 96))

    def test_wrong_ndim(self) -> None:
        with pytest.raises(ValueError, match="images must have shape"):
            _tiny()(torch.randn(3, 96, 96))

    def test_bank_features_need_filter(self) -> None:
        model = _tiny(use_filter=False)
        with pytest.raises(ValueError, match="use_filter=False"):
            model(torch.randn(1, 3, 32, 32), return_bank_features=True)
        with pytest.raises(ValueError, match="use_filter=False"):
            model.prototypes  # noqa: B018

    def test_bad_constructor_arguments(self) -> None:
        with pytest.raises(ValueError, match="VisionTransformer"):
            CoTAPVisionTransformer(nn.Linear(3, 3))
        with pytest.raises(ValueError, match="prototype_size"):
            _tiny(prototype_size=2)
        with pytest.raises(ValueError, match="class token"):
            CoTAPVisionTransformer(
                VisionTransformer(
                    img_size=32,
                    patch_size=16,
                    embed_dim=32,
                    depth=1,
                    num_heads=2,
                    class_token=False,
                    global_pool="avg",
                )
            )
        with pytest.raises(ValueError, match="only used when vit is a model name"):
            CoTAPVisionTransformer(_reg_vit(), depth=3)
        with pytest.raises(ValueError, match="pretrained"):
            CoTAPVisionTransformer("vit_tiny_patch16_224", pretrained=True)

    def test_fixed_size_vit_is_refused_and_left_unchanged(self) -> None:
        vit = VisionTransformer(
            img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2
        )
        with pytest.raises(ValueError, match="dynamic_img_size=True"):
            CoTAPVisionTransformer(vit)
        assert not vit.dynamic_img_size and vit.patch_embed.strict_img_size
        assert vit.patch_embed.flatten
