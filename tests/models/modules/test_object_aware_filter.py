from __future__ import annotations

import math
from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from lightly_cotap.models.modules import ObjectAwareFilter
from lightly_cotap.train.host_sync import forbid_host_sync

D = 32
HEADS = 4


def _block(
    dtype: torch.dtype = torch.float64, qkv_bias: bool = True, **options: Any
) -> Block:
    """A timm ViT block; ``options`` are timm's (``init_values``, ``qk_norm``, ...)."""
    torch.manual_seed(0)
    block = Block(dim=D, num_heads=HEADS, qkv_bias=qkv_bias, mlp_ratio=2.0, **options)
    for p in block.parameters():
        # Non-trivial norm / bias parameters as well.
        p.data.normal_(0.0, 0.3)
    return block.to(dtype).eval()


def _filter(
    block: Block, num_prototypes: int = 5, prototype_size: int = 3, **kwargs: bool
) -> ObjectAwareFilter:
    flt = ObjectAwareFilter(
        block,
        embed_dim=D,
        num_prototypes=num_prototypes,
        prototype_size=prototype_size,
        **kwargs,
    )
    for p in flt.parameters():
        p.data.normal_(0.0, 0.5)
    return flt.to(torch.float64)


def _reference(
    flt: ObjectAwareFilter, block: Block, cls: Tensor, patches: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Naive filter written from the formula: explicit loops over the k x k offsets.

    Returns the CLS output, the dense output and the patch attention (B, nh, M, H, W).
    """
    b, d, h, w = patches.shape
    attn = block.attn
    nh, hd = attn.num_heads, attn.head_dim
    m, _, k, _ = flt.prototypes.shape
    wq, wk, wv = block.attn.qkv.weight.split(d, dim=0)
    bq, bk, bv = block.attn.qkv.bias.split(d, dim=0)

    def ln(x: Tensor, norm: nn.Module) -> Tensor:
        if isinstance(norm, nn.Identity):
            return x
        assert isinstance(norm, nn.LayerNorm)
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias

    def scale(x: Tensor, layer_scale: Any) -> Tensor:
        # LayerScale (DINOv2-style blocks, timm's init_values) multiplies by gamma.
        return x if isinstance(layer_scale, nn.Identity) else x * layer_scale.gamma

    def update(x: Tensor, out: Tensor) -> Tensor:
        # attn.norm is the optional norm before the projection (scale_attn_norm).
        x = x + scale(attn.proj(ln(out, attn.norm)), block.ls1)
        updated: Tensor = x + scale(block.mlp(ln(x, block.norm2)), block.ls2)
        return updated

    protos = ln(flt.prototypes.permute(0, 2, 3, 1), flt.norm_in)  # (M, k, k, D)
    # qk-norm: a LayerNorm over the head dimension of every key and query.
    keys = ln((protos @ wk.T + bk).reshape(m, k, k, nh, hd), attn.k_norm)
    values = (protos @ wv.T + bv).reshape(m, k * k, nh, hd).mean(1)  # (M, nh, hd)

    p = patches.permute(0, 2, 3, 1)  # (B, H, W, D)
    q = ln((ln(p, block.norm1) @ wq.T + bq).reshape(b, h, w, nh, hd), attn.q_norm)
    logits = torch.zeros(b, nh, m, h, w, dtype=patches.dtype)
    r = k // 2
    for y in range(h):
        for x in range(w):
            for dy in range(k):
                for dx in range(k):
                    yy, xx = y + dy - r, x + dx - r
                    if 0 <= yy < h and 0 <= xx < w:  # zero padding
                        logits[:, :, :, y, x] += torch.einsum(
                            "bnc,mnc->bnm", q[:, yy, xx], keys[:, dy, dx]
                        )
    a = (logits / m**0.5).softmax(dim=2)  # softmax over prototypes
    out = torch.einsum("bnmyx,mnc->byxnc", a, values).reshape(b, h, w, d)
    p_new = update(p, out)
    dense = ln(torch.cat([p, p_new], -1), flt.norm_out_patch).permute(0, 3, 1, 2)

    qc = ln((ln(cls, block.norm1) @ wq.T + bq).reshape(b, nh, hd), attn.q_norm)
    kc = keys.mean(dim=(1, 2))  # (M, nh, hd)
    ac = (torch.einsum("bnc,mnc->bnm", qc, kc) / m**0.5).softmax(-1)
    outc = torch.einsum("bnm,mnc->bnc", ac, values).reshape(b, d)
    cls_new = update(cls, outc)
    cls_out = ln(torch.cat([cls, cls_new], -1), flt.norm_out_cls)
    return cls_out, dense, a


def _compare_with_reference(
    flt: ObjectAwareFilter, block: Block, hw: tuple[int, int], seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Runs the filter and the reference on random float64 inputs, asserts equality.

    Returns the patches, the filter's dense output and the reference attention.
    """
    torch.manual_seed(seed)
    cls = torch.randn(2, D, dtype=torch.float64)
    patches = torch.randn(2, D, *hw, dtype=torch.float64)
    cls_out, dense = flt(cls, patches)
    ref_cls, ref_dense, ref_attn = _reference(flt, block, cls, patches)
    torch.testing.assert_close(dense, ref_dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cls_out, ref_cls, rtol=1e-10, atol=1e-10)
    return patches, dense, ref_attn


class TestObjectAwareFilter:
    @pytest.mark.parametrize("prototype_size", [1, 3, 5])
    @pytest.mark.parametrize("hw", [(4, 5), (3, 3)])
    def test_matches_reference(self, prototype_size: int, hw: tuple[int, int]) -> None:
        block = _block()
        flt = _filter(block, prototype_size=prototype_size)
        _, dense, _ = _compare_with_reference(flt, block, hw, seed=1)
        assert dense.shape == (2, flt.out_dim, *hw)
        assert flt.out_dim == 2 * D

    @pytest.mark.parametrize(
        "options",
        [
            dict(init_values=0.5),  # LayerScale ls1 / ls2
            dict(qk_norm=True),  # LayerNorm on keys and queries per head
            dict(scale_attn_norm=True),  # LayerNorm before attn.proj
            dict(init_values=0.5, qk_norm=True),  # DINOv2-style with qk-norm
        ],
        ids=["layer_scale", "qk_norm", "attn_norm", "layer_scale_qk_norm"],
    )
    def test_matches_reference_on_block_options(self, options: dict[str, Any]) -> None:
        block = _block(**options)
        # Every optional layer exists and has random (non-identity) parameters.
        if "init_values" in options:
            assert not isinstance(block.ls1, nn.Identity)
            assert not torch.allclose(block.ls1.gamma, block.ls2.gamma)
        if "qk_norm" in options:
            assert isinstance(block.attn.q_norm, nn.LayerNorm)
            assert isinstance(block.attn.k_norm, nn.LayerNorm)
        if "scale_attn_norm" in options:
            assert isinstance(block.attn.norm, nn.LayerNorm)
        flt = _filter(block)
        patches, _, ref_attn = _compare_with_reference(flt, block, (4, 3), seed=4)
        torch.testing.assert_close(
            flt.patch_attention(patches), ref_attn, rtol=1e-10, atol=1e-12
        )

    def test_zero_cross_attention_reduces_to_mlp_update(self) -> None:
        block = _block()
        flt = _filter(block)
        # Force the cross-attention output to zero.
        block.attn.proj.weight.data.zero_()
        block.attn.proj.bias.data.zero_()
        torch.manual_seed(2)
        cls = torch.randn(3, D, dtype=torch.float64)
        patches = torch.randn(3, D, 4, 4, dtype=torch.float64)
        cls_out, dense = flt(cls, patches)

        p = patches.flatten(2).transpose(1, 2)
        mlp = block.mlp
        norm2 = block.norm2

        def expected(x: Tensor, norm_out: nn.LayerNorm) -> Tensor:
            # [x ; x + MLP(LN(x))], independently computed.
            h = F.layer_norm(x, (D,), norm2.weight, norm2.bias, norm2.eps)
            h = mlp.fc2(F.gelu(mlp.fc1(h)))
            cat = torch.cat([x, x + h], dim=-1)
            return F.layer_norm(
                cat, (2 * D,), norm_out.weight, norm_out.bias, norm_out.eps
            )

        exp_dense = expected(p, flt.norm_out_patch).transpose(1, 2).reshape(3, -1, 4, 4)
        torch.testing.assert_close(dense, exp_dense, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(
            cls_out, expected(cls, flt.norm_out_cls), rtol=1e-10, atol=1e-10
        )

    def test_single_prototype_uniform_attention(self) -> None:
        block = _block()
        flt = _filter(block, num_prototypes=1)
        torch.manual_seed(3)
        patches = torch.randn(2, D, 4, 3, dtype=torch.float64)
        cls = torch.randn(2, D, dtype=torch.float64)
        attn = flt.patch_attention(patches)
        assert attn.shape == (2, HEADS, 1, 4, 3)
        torch.testing.assert_close(attn, torch.ones_like(attn))

        # Every location reads the same value: proj(mean_d W_v LN_in(P)).
        protos = F.layer_norm(
            flt.prototypes.permute(0, 2, 3, 1),
            (D,),
            flt.norm_in.weight,
            flt.norm_in.bias,
            flt.norm_in.eps,
        )
        wv = block.attn.qkv.weight[2 * D :]
        bv = block.attn.qkv.bias[2 * D :]
        value = (protos @ wv.T + bv).reshape(-1, D).mean(0)
        read = block.attn.proj(value)

        def expected(x: Tensor, norm: nn.LayerNorm) -> Tensor:
            x_new = x + read
            x_new = x_new + block.mlp(block.norm2(x_new))
            out: Tensor = norm(torch.cat([x, x_new], dim=-1))
            return out

        cls_out, dense = flt(cls, patches)
        p = patches.flatten(2).transpose(1, 2)
        torch.testing.assert_close(
            dense.flatten(2).transpose(1, 2),
            expected(p, flt.norm_out_patch),
            rtol=1e-10,
            atol=1e-10,
        )
        torch.testing.assert_close(
            cls_out, expected(cls, flt.norm_out_cls), rtol=1e-10, atol=1e-10
        )

    def test_attention_sums_to_one_over_prototypes(self) -> None:
        flt = _filter(_block(), num_prototypes=7)
        attn = flt.patch_attention(torch.randn(2, D, 3, 4, dtype=torch.float64))
        torch.testing.assert_close(attn.sum(dim=2), torch.ones(2, HEADS, 3, 4).double())

    @pytest.mark.parametrize("train_prototypes", [False, True])
    def test_gradients(self, train_prototypes: bool) -> None:
        block = _block(torch.float32)
        flt = ObjectAwareFilter(
            block, embed_dim=D, num_prototypes=4, train_prototypes=train_prototypes
        )
        cls = torch.randn(2, D, requires_grad=True)
        patches = torch.randn(2, D, 3, 3, requires_grad=True)
        cls_out, dense = flt(cls, patches)
        (cls_out.square().sum() + dense.square().sum()).backward()
        assert flt.prototypes.requires_grad
        if train_prototypes:
            assert flt.prototypes.grad is not None
            assert flt.prototypes.grad.abs().sum() > 0
        else:
            assert flt.prototypes.grad is None
        for param in (
            flt.norm_in.weight,
            flt.norm_out_patch.weight,
            flt.norm_out_cls.weight,
            block.attn.qkv.weight,
            block.attn.proj.weight,
            block.mlp.fc1.weight,
        ):
            assert param.grad is not None and param.grad.abs().sum() > 0
        assert patches.grad is not None and cls.grad is not None

    def test_block_is_shared_not_copied(self) -> None:
        block = _block(torch.float32)
        flt = ObjectAwareFilter(block, embed_dim=D, num_prototypes=4)
        assert flt.block is block
        assert sorted(flt.state_dict()) == [
            "norm_in.bias",
            "norm_in.weight",
            "norm_out_cls.bias",
            "norm_out_cls.weight",
            "norm_out_patch.bias",
            "norm_out_patch.weight",
            "prototypes",
            "prototypes_initialized",
        ]
        assert flt.prototypes.shape == (4, D, 3, 3)
        cls, patches = torch.randn(1, D), torch.randn(1, D, 2, 2)
        before = flt(cls, patches)[1]
        mlp: Any = block.mlp
        fc2 = mlp.fc2
        fc2.bias.data += 1.0
        after = flt(cls, patches)[1]
        assert not torch.allclose(before, after)

    def test_set_prototypes(self) -> None:
        flt = ObjectAwareFilter(_block(torch.float32), embed_dim=D, num_prototypes=4)
        assert not bool(flt.prototypes_initialized)
        new = torch.randn(4, D * 9)
        flt.set_prototypes(new)
        assert bool(flt.prototypes_initialized)
        torch.testing.assert_close(flt.prototypes.data, new.reshape(4, D, 3, 3))
        flt.set_prototypes(new.reshape(4, D, 3, 3) * 2)
        torch.testing.assert_close(flt.prototypes.data, 2 * new.reshape(4, D, 3, 3))
        with pytest.raises(ValueError, match=r"\(4, 32, 3, 3\)"):
            flt.set_prototypes(torch.randn(5, D, 3, 3))

    def test_initialized_flag_is_read_without_the_device(self) -> None:
        flt = ObjectAwareFilter(_block(torch.float32), embed_dim=D, num_prototypes=4)
        with forbid_host_sync():
            assert flt.is_initialized is False
        flt.set_prototypes(torch.randn(4, D * 9))
        with forbid_host_sync():
            assert flt.is_initialized
        # Loading a state dict refreshes the host copy, in both directions.
        fresh = ObjectAwareFilter(_block(torch.float32), embed_dim=D, num_prototypes=4)
        state = flt.state_dict()
        fresh.load_state_dict(state)
        assert fresh.is_initialized and bool(fresh.prototypes_initialized)
        state["prototypes_initialized"] = torch.tensor(False)
        flt.load_state_dict(state)
        assert not flt.is_initialized
        # Also when the filter is loaded as part of a larger module.
        parent = nn.ModuleDict({"filter": fresh})
        parent.load_state_dict({f"filter.{k}": v for k, v in state.items()})
        assert not fresh.is_initialized

    def test_defaults_are_the_papers(self) -> None:
        block = _block(torch.float32)
        flt = ObjectAwareFilter(block, embed_dim=D)
        # 64 prototypes of 3 x 3, not trained by the main losses.
        assert (flt.num_prototypes, flt.prototype_size, flt.embed_dim) == (64, 3, D)
        assert flt.train_prototypes is False
        assert flt.prototypes.shape == (64, D, 3, 3)
        cls_out, dense = flt(torch.randn(2, D), torch.randn(2, D, 3, 3))
        (cls_out.sum() + dense.square().sum()).backward()
        assert flt.prototypes.grad is None
        assert flt.norm_in.weight.grad is not None

    def test_smallest_sizes(self) -> None:
        # One channel, one head, one 1 x 1 prototype: valid, if useless.
        flt = ObjectAwareFilter(
            Block(dim=1, num_heads=1), embed_dim=1, num_prototypes=1, prototype_size=1
        )
        cls_out, dense = flt(torch.randn(2, 1), torch.randn(2, 1, 2, 3))
        assert cls_out.shape == (2, 2) and dense.shape == (2, 2, 2, 3)

    def test_prototypes_start_truncated_normal(self) -> None:
        # Default size: 64 prototypes of 32 x 3 x 3, 18,432 draws.
        flt = ObjectAwareFilter(_block(torch.float32), embed_dim=D)
        values = flt.prototypes.detach().double().flatten()
        # A standard normal truncated to [-2, 2] has mean 0 and variance
        # 1 - 2 * 2 * pdf(2) / (cdf(2) - cdf(-2)).
        pdf = math.exp(-2.0) / math.sqrt(2.0 * math.pi)
        mass = math.erf(2.0 / math.sqrt(2.0))
        std = math.sqrt(1.0 - 4.0 * pdf / mass)
        assert -2.0 <= values.min() < -1.9
        assert 1.9 < values.max() <= 2.0
        assert abs(values.mean().item()) < 0.03  # 4.6 standard errors
        assert abs(values.std().item() - std) < 0.02

    def test_norms_take_the_block_eps(self) -> None:
        block = _block(norm_layer=partial(nn.LayerNorm, eps=1e-3))
        flt = _filter(block)
        norms = (flt.norm_in, flt.norm_out_patch, flt.norm_out_cls)
        assert [norm.eps for norm in norms] == [1e-3] * 3
        # Without a norm1 eps (a block without the first norm): timm ViTs' 1e-6.
        block = _block()
        block.norm1 = nn.Identity()
        flt = _filter(block)
        norms = (flt.norm_in, flt.norm_out_patch, flt.norm_out_cls)
        assert [norm.eps for norm in norms] == [1e-6] * 3
        _compare_with_reference(flt, block, (3, 3), seed=5)

    def test_invalid_arguments(self) -> None:
        block = _block(torch.float32)
        for size in (2, 0, -1):
            with pytest.raises(ValueError, match="prototype_size"):
                ObjectAwareFilter(block, embed_dim=D, prototype_size=size)
        for number in (0, -1):
            with pytest.raises(ValueError, match="num_prototypes"):
                ObjectAwareFilter(block, embed_dim=D, num_prototypes=number)
        with pytest.raises(ValueError, match="embed_dim must be positive"):
            ObjectAwareFilter(block, embed_dim=0)
        with pytest.raises(ValueError, match="qkv"):
            ObjectAwareFilter(block, embed_dim=D + 1)
        with pytest.raises(ValueError, match="timm VisionTransformer Block"):
            ObjectAwareFilter(nn.Linear(D, D), embed_dim=D)

    def test_invalid_inputs(self) -> None:
        flt = ObjectAwareFilter(_block(torch.float32), embed_dim=D, num_prototypes=4)
        with pytest.raises(ValueError, match="patches must have shape"):
            flt(torch.randn(2, D), torch.randn(2, D + 1, 3, 3))
        with pytest.raises(ValueError, match="patches must have shape"):
            flt(torch.randn(2, D), torch.randn(2, 9, D))
        with pytest.raises(ValueError, match="patches must have shape"):
            flt(torch.randn(2, D), torch.randn(2, D, 9))
        with pytest.raises(ValueError, match="patches must have shape"):
            flt.patch_attention(torch.randn(2, D, 9))
        for cls in (torch.randn(3, D), torch.randn(2, D + 1), torch.randn(2, D, 1)):
            with pytest.raises(ValueError, match=r"cls must have shape \(2, 32\)"):
                flt(cls, torch.randn(2, D, 3, 3))

    def test_block_without_gate_attribute(self) -> None:
        # timm's Attention before gated attention existed has no ``gate`` at all.
        block = _block()
        del block.attn.gate
        assert not hasattr(block.attn, "gate")
        _compare_with_reference(_filter(block), block, (3, 2), seed=6)

    def test_rejects_blocks_it_cannot_reuse(self) -> None:
        block = _block(torch.float32)
        del block.ls1
        with pytest.raises(ValueError, match=r"Block lacks \['ls1'\]"):
            ObjectAwareFilter(block, embed_dim=D)
        block = _block(torch.float32)
        del block.attn.k_norm
        with pytest.raises(ValueError, match=r"Block lacks \['attn.k_norm'\]"):
            ObjectAwareFilter(block, embed_dim=D)
        block = _block(torch.float32)
        block.attn = Attention(D, num_heads=HEADS, qkv_bias=True, gated=True)
        with pytest.raises(ValueError, match="Gated attention"):
            ObjectAwareFilter(block, embed_dim=D)
        block = _block(torch.float32)
        block.attn.qkv = nn.Sequential(nn.Linear(D, 3 * D))
        with pytest.raises(ValueError, match="qkv must be nn.Linear"):
            ObjectAwareFilter(block, embed_dim=D)
        block = _block(torch.float32)
        block.attn.qkv = nn.Linear(D, 2 * D)
        with pytest.raises(ValueError, match="has 64 outputs, expected"):
            ObjectAwareFilter(block, embed_dim=D)
