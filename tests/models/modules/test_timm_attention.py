from __future__ import annotations

from typing import Any

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from lightly_cotap.models.modules.timm_attention import (
    cls_to_patch_attention,
    qkv_projection,
)


def _block(qkv_bias: bool = True) -> Any:
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=3, qkv_bias=qkv_bias
    )
    return vit.blocks[0]


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize(
    "parts, rows",
    [("q", (0,)), ("k", (1,)), ("v", (2,)), ("kv", (1, 2)), ("qkv", (0, 1, 2))],
)
def test_qkv_projection_matches_fused_layer(
    qkv_bias: bool, parts: str, rows: tuple[int, ...]
) -> None:
    attn = _block(qkv_bias).attn
    tokens = torch.randn(2, 5, 24)
    # Reference: the fused layer on all tokens, split as timm's Attention does.
    full = attn.qkv(tokens).reshape(2, 5, 3, 3, 8)
    out = qkv_projection(attn, tokens, parts)
    assert out.shape == (2, 5, len(parts), 3, 8)
    torch.testing.assert_close(out, full[:, :, list(rows)])


@pytest.mark.parametrize("parts", ["", "qv", "x", "vq"])
def test_qkv_projection_rejects_other_parts(parts: str) -> None:
    with pytest.raises(ValueError, match="parts must be a consecutive part"):
        qkv_projection(_block().attn, torch.randn(1, 2, 24), parts)


def test_cls_to_patch_attention_matches_attention_matrix() -> None:
    block = _block()
    tokens = torch.randn(2, 1 + 6, 24)
    h = block.norm1(tokens)
    qkv = block.attn.qkv(h).reshape(2, 7, 3, 3, 8).permute(2, 0, 3, 1, 4)
    attn = (qkv[0] @ qkv[1].transpose(-2, -1) * 8**-0.5).softmax(-1)
    expected = attn[:, :, 0, 1:].mean(1)
    torch.testing.assert_close(cls_to_patch_attention(block, tokens, 1), expected)
