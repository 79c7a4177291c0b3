"""Query / key / value projections read from a timm ``Attention`` with a fused qkv.

timm's ``Attention`` computes q, k and v of the same tokens in one call; the
object-aware filter and the foreground mask need them for different tokens (patch
queries against prototype keys, the CLS query against all keys), so they apply
slices of the fused ``qkv`` weight. The slicing lives here, once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Position of the query, key and value rows in timm's fused ``qkv`` weight.
_QKV_ORDER = "qkv"


def qkv_projection(attn: Any, tokens: Tensor, parts: str) -> Tensor:
    """Projects tokens with consecutive parts of a fused ``qkv`` linear layer.

    Args:
        attn: A timm ``Attention`` (``qkv`` is an ``nn.Linear`` with outputs
            ``[q; k; v]``, plus ``num_heads`` and ``head_dim``).
        tokens: Input tokens (already normalised). Shape: (..., D).
        parts: Consecutive parts of ``"qkv"``: ``"q"``, ``"k"``, ``"v"``,
            ``"qk"``, ``"kv"`` or ``"qkv"``.

    Returns:
        The projections without q / k norms, one slot per part.
        Shape: (..., len(parts), num_heads, head_dim).

    Raises:
        ValueError: If ``parts`` is not a consecutive part of ``"qkv"``.
    """
    start = _QKV_ORDER.find(parts)
    if not parts or start < 0:
        raise ValueError(f"parts must be a consecutive part of 'qkv', got {parts!r}.")
    qkv: nn.Linear = attn.qkv
    width = qkv.out_features // 3
    rows = slice(start * width, (start + len(parts)) * width)
    bias = None if qkv.bias is None else qkv.bias[rows]
    out = F.linear(tokens, qkv.weight[rows], bias)
    heads: Tensor = out.unflatten(-1, (len(parts), attn.num_heads, attn.head_dim))
    return heads


def cls_to_patch_attention(
    block: Any, tokens: Tensor, num_prefix_tokens: int
) -> Tensor:
    """Head-averaged attention of the CLS token to the patches in a timm block.

    The softmax runs over all tokens (CLS, registers and patches), as in the block;
    the patch columns are returned.

    Args:
        block: A timm ``VisionTransformer`` block (``norm1`` and ``attn``).
        tokens: The block's input tokens, CLS first. Shape: (B, N_prefix + N, D).
        num_prefix_tokens: Number of prefix tokens (CLS and registers).

    Returns:
        Attention of the CLS token to every patch. Shape: (B, N).
    """
    attn = block.attn
    normed = block.norm1(tokens)
    q = attn.q_norm(qkv_projection(attn, normed[:, 0], "q")[:, 0])
    k = attn.k_norm(qkv_projection(attn, normed, "k")[:, :, 0])
    logits = torch.einsum("bhd,bnhd->bhn", q, k) * float(attn.scale)
    probs = logits.float().softmax(dim=-1)
    attention: Tensor = probs[:, :, num_prefix_tokens:].mean(dim=1)
    return attention
