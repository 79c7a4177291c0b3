"""Object-aware filter of CoTAP: learnable object prototypes read by cross-attention."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightly_cotap.models.modules.timm_attention import qkv_projection


class ObjectAwareFilter(nn.Module):
    """Object-aware filter from the CoTAP paper [0].

    M object prototypes, each a k x k template in token space, are read by
    cross-attention from the patch tokens, using the last ViT block's own weights
    (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp``, layer scales and drop
    paths). The block is shared, not copied: the filter adds only the prototypes and
    three layer norms.

    For the patch tokens p (output of the last block) at grid position u:

    - ``Q = W_q LN1(p)`` per head, ``K_m = W_k LN_in(P_m)`` and ``V_m = W_v LN_in(P_m)``
      for every prototype position;
    - ``a[h, m, u] = M^-1/2 * sum_{d in k x k} <Q_h(u + d), K_{h,m}(d)>`` (a grouped
      conv2d with zero padding), softmax over the M prototypes;
    - ``out = proj(sum_m a[m, u] * mean_d V_m(d))``, ``p' = p + out``,
      ``p' = p' + MLP(LN2(p'))``;
    - dense output ``LN_out_patch([p ; p'])`` of width 2D.

    The CLS branch is the same ordinary attention from the CLS token to the prototypes
    with keys and values averaged over the k x k positions; its output is
    ``LN_out_cls([cls ; cls'])``. The logit scale is M^-1/2 (not d_head^-1/2) as in the
    official code [1].

    Prototype gradient (``train_prototypes``): the official code feeds
    ``prototypes.data`` to the cross-attention, so the main losses do NOT train the
    prototypes; they are set by spherical k-means on a memory bank of pooled block
    features and then trained only by
    :class:`~lightly_cotap.loss.PrototypeEntropyLoss`. The default
    ``train_prototypes=False`` reproduces this (the prototypes are detached inside
    ``forward``; they still require grad so that the entropy loss can train them).
    ``train_prototypes=True`` follows the paper's wording ("learnable prototypes") and
    lets the main losses back-propagate into them as well. ``norm_in`` is trained by
    the main losses in both cases, as in the official code.

    Note: the block is held by reference and not registered as a sub-module, so it
    does not appear in this module's ``state_dict`` / ``parameters`` and ``.to()`` does
    not move it. Inside :class:`~lightly_cotap.models.cotap_vit.CoTAPVisionTransformer`
    the block belongs to the ViT and everything moves together (``copy.deepcopy`` of
    the whole model keeps the sharing).

    - [0]: Wen et al., Semantic Concentration for Self-Supervised Dense
      Representations Learning, 2025, https://arxiv.org/abs/2509.09429
    - [1]: https://github.com/KID-7391/CoTAP

    Attributes:
        embed_dim: Token width D of the ViT.
        num_prototypes: Number M of object prototypes.
        prototype_size: Spatial size k of every prototype (odd).
        train_prototypes: Whether the main losses back-propagate into the prototypes.
        prototypes: The prototypes. Shape: (M, D, k, k).
        prototypes_initialized: Boolean buffer, True once the prototypes were set by
            :meth:`set_prototypes` (e.g. k-means) or loaded from a checkpoint.
    """

    prototypes_initialized: Tensor

    def __init__(
        self,
        block: nn.Module,
        embed_dim: int,
        num_prototypes: int = 64,
        prototype_size: int = 3,
        train_prototypes: bool = False,
    ) -> None:
        """Initializes the ObjectAwareFilter with the specified parameters.

        Args:
            block: The last block of a timm ``VisionTransformer``
                (``timm.models.vision_transformer.Block`` with a standard
                ``Attention`` that has a fused ``qkv`` projection).
            embed_dim: Token width D; must match the block.
            num_prototypes: Number M of prototypes (paper: 64).
            prototype_size: Spatial size k of each prototype, odd (paper: 3).
            train_prototypes: Let the main losses back-propagate into the prototypes
                (default False, like the official code).

        Raises:
            ValueError: If the block is not a supported timm block or an argument is
                invalid.
        """
        super().__init__()
        if embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {embed_dim}.")
        if num_prototypes <= 0:
            raise ValueError(f"num_prototypes must be positive, got {num_prototypes}.")
        if prototype_size <= 0 or prototype_size % 2 == 0:
            raise ValueError(
                f"prototype_size must be a positive odd integer, got {prototype_size}."
            )
        _validate_block(block, embed_dim)

        self.embed_dim = embed_dim
        self.num_prototypes = num_prototypes
        self.prototype_size = prototype_size
        self.train_prototypes = train_prototypes
        # Held by reference (a tuple is not registered as a sub-module).
        self._block: tuple[Any] = (block,)

        self.prototypes = nn.Parameter(
            torch.empty(num_prototypes, embed_dim, prototype_size, prototype_size)
        )
        nn.init.trunc_normal_(self.prototypes, std=1.0, a=-2.0, b=2.0)
        eps = _layer_norm_eps(block)
        self.norm_in = nn.LayerNorm(embed_dim, eps=eps)
        self.norm_out_patch = nn.LayerNorm(2 * embed_dim, eps=eps)
        self.norm_out_cls = nn.LayerNorm(2 * embed_dim, eps=eps)
        self.register_buffer("prototypes_initialized", torch.tensor(False))
        # Host copy of the buffer: the training step asks every step whether the
        # prototypes are initialised, which must not wait for the device.
        self._initialized = False
        self.register_load_state_dict_post_hook(_read_initialized_flag)

    @property
    def block(self) -> nn.Module:
        """The shared ViT block whose weights the filter reuses."""
        block: nn.Module = self._block[0]
        return block

    @property
    def _blk(self) -> Any:
        """The shared block, untyped (timm is not type-checked)."""
        return self._block[0]

    @property
    def is_initialized(self) -> bool:
        """The value of :attr:`prototypes_initialized`, read without the device."""
        return self._initialized

    def mark_initialized(self) -> None:
        """Marks the prototypes as set (after writing them directly)."""
        self.prototypes_initialized.fill_(True)
        self._initialized = True

    @property
    def out_dim(self) -> int:
        """Width 2D of the filter's outputs."""
        return 2 * self.embed_dim

    @torch.no_grad()
    def set_prototypes(self, prototypes: Tensor) -> None:
        """Overwrites the prototypes (e.g. with k-means centers).

        Args:
            prototypes: New prototypes. Shape: (M, D, k, k) or (M, D * k * k).

        Raises:
            ValueError: If the shape does not match.
        """
        shape = tuple(self.prototypes.shape)
        flat = (shape[0], shape[1] * shape[2] * shape[3])
        if tuple(prototypes.shape) not in (shape, flat):
            raise ValueError(
                f"prototypes must have shape {shape} or {flat}, got "
                f"{tuple(prototypes.shape)}."
            )
        self.prototypes.copy_(prototypes.reshape(shape))
        self.mark_initialized()

    def forward(self, cls: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        """Applies the filter to the outputs of the last ViT block.

        Args:
            cls: CLS token after the last block. Shape: (B, D).
            patches: Patch tokens after the last block as a map. Shape: (B, D, H, W).

        Returns:
            Tuple ``(cls_out, dense_out)`` with shapes (B, 2D) and (B, 2D, H, W).

        Raises:
            ValueError: If the input shapes are invalid.
        """
        self._check_inputs(cls=cls, patches=patches)
        keys, values = self._prototype_keys_values()
        dense = self._patch_branch(patches, keys, values)
        cls_out = self._cls_branch(cls, keys, values)
        return cls_out, dense

    def patch_attention(self, patches: Tensor) -> Tensor:
        """Attention of every patch to the prototypes (softmax over prototypes).

        Args:
            patches: Patch tokens after the last block. Shape: (B, D, H, W).

        Returns:
            Attention weights. Shape: (B, num_heads, M, H, W).
        """
        self._check_inputs(cls=None, patches=patches)
        keys, _ = self._prototype_keys_values()
        q = self._queries(patches.flatten(2).transpose(1, 2))
        b, _, h, w = patches.shape
        attn: Tensor = self._patch_logits(q, keys, h, w).softmax(dim=2)
        return attn

    # -- internals ---------------------------------------------------------------

    def _check_inputs(self, cls: Tensor | None, patches: Tensor) -> None:
        if patches.ndim != 4 or patches.shape[1] != self.embed_dim:
            raise ValueError(
                f"patches must have shape (B, {self.embed_dim}, H, W), got "
                f"{tuple(patches.shape)}."
            )
        if cls is not None and (
            cls.ndim != 2
            or cls.shape[1] != self.embed_dim
            or cls.shape[0] != patches.shape[0]
        ):
            raise ValueError(
                f"cls must have shape ({patches.shape[0]}, {self.embed_dim}), got "
                f"{tuple(cls.shape)}."
            )

    def _queries(self, tokens: Tensor) -> Tensor:
        """Per-head queries of LN1(tokens). (B, N, D) -> (B, N, heads, head_dim)."""
        block = self._blk
        q = qkv_projection(block.attn, block.norm1(tokens), "q")[..., 0, :, :]
        q_normed: Tensor = block.attn.q_norm(q)
        return q_normed

    def _prototype_keys_values(self) -> tuple[Tensor, Tensor]:
        """Keys and values of the prototypes.

        Returns:
            keys (M, k, k, heads, head_dim) and values averaged over the k x k
            positions (M, heads, head_dim).
        """
        attn = self._blk.attn
        prototypes: Tensor = self.prototypes
        if not self.train_prototypes:
            prototypes = prototypes.detach()
        tokens = self.norm_in(prototypes.permute(0, 2, 3, 1))  # (M, k, k, D)
        kv = qkv_projection(attn, tokens, "kv")
        keys = attn.k_norm(kv[..., 0, :, :])
        values = kv[..., 1, :, :].mean(dim=(1, 2))
        return keys, values

    def _patch_logits(self, q: Tensor, keys: Tensor, height: int, width: int) -> Tensor:
        """Prototype logits of every patch. Returns (B, heads, M, H, W)."""
        b = q.shape[0]
        m, k = keys.shape[0], keys.shape[1]
        heads, head_dim = keys.shape[3], keys.shape[4]
        q_map = q.reshape(b, height, width, heads * head_dim).permute(0, 3, 1, 2)
        # Grouped conv: group h correlates the head-h query map with the head-h keys
        # of every prototype; output channel h * M + m.
        weight = keys.permute(3, 0, 4, 1, 2).reshape(heads * m, head_dim, k, k)
        logits = F.conv2d(q_map, weight.to(q_map.dtype), padding=k // 2, groups=heads)
        scaled: Tensor = logits.reshape(b, heads, m, height, width) * (m**-0.5)
        return scaled

    def _residual(self, x: Tensor, out: Tensor) -> Tensor:
        """Block-style residual update with the shared weights."""
        block = self._blk
        x = x + block.drop_path1(block.ls1(out))
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return x

    def _project(self, out: Tensor) -> Tensor:
        attn = self._blk.attn
        out = attn.norm(out)
        out = attn.proj(out)
        out = attn.proj_drop(out)
        return out

    def _patch_branch(self, patches: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        b, d, h, w = patches.shape
        attn = self._blk.attn
        p = patches.flatten(2).transpose(1, 2)  # (B, N, D)
        q = self._queries(p)
        logits = self._patch_logits(q, keys, h, w)  # (B, heads, M, H, W)
        weights = attn.attn_drop(logits.softmax(dim=2))
        weights = weights.flatten(3).transpose(2, 3)  # (B, heads, N, M)
        out = weights @ values.transpose(0, 1).to(weights.dtype)  # (B, heads, N, hd)
        out = out.transpose(1, 2).flatten(2)  # (B, N, heads * hd)
        p_new = self._residual(p, self._project(out))
        dense: Tensor = self.norm_out_patch(torch.cat([p, p_new], dim=-1))  # (B,N,2D)
        return dense.transpose(1, 2).reshape(b, 2 * d, h, w)

    def _cls_branch(self, cls: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        attn = self._blk.attn
        m = keys.shape[0]
        q = self._queries(cls)  # (B, heads, hd)
        mean_keys = keys.mean(dim=(1, 2)).to(q.dtype)  # (M, heads, hd)
        logits = torch.einsum("bhd,mhd->bhm", q, mean_keys) * (m**-0.5)
        weights = attn.attn_drop(logits.softmax(dim=-1))
        out = torch.einsum("bhm,mhd->bhd", weights, values.to(weights.dtype))
        cls_new = self._residual(cls, self._project(out.flatten(1)))
        out_cls: Tensor = self.norm_out_cls(torch.cat([cls, cls_new], dim=-1))
        return out_cls


def _read_initialized_flag(module: nn.Module, incompatible_keys: Any) -> None:
    """Refreshes the host copy of ``prototypes_initialized`` after loading."""
    assert isinstance(module, ObjectAwareFilter)
    module._initialized = bool(module.prototypes_initialized)


def _validate_block(block: Any, embed_dim: int) -> None:
    """Checks that ``block`` is a pre-norm timm ViT block the filter can reuse."""
    required = (
        "norm1",
        "attn",
        "ls1",
        "drop_path1",
        "norm2",
        "mlp",
        "ls2",
        "drop_path2",
    )
    missing = [name for name in required if not hasattr(block, name)]
    attn = getattr(block, "attn", None)
    attn_required = ("qkv", "num_heads", "head_dim", "q_norm", "k_norm", "norm", "proj")
    missing += [f"attn.{n}" for n in attn_required if not hasattr(attn, n)]
    if missing:
        raise ValueError(
            f"block must be a timm VisionTransformer Block with a fused-qkv Attention; "
            f"{type(block).__name__} lacks {missing}."
        )
    assert attn is not None
    if getattr(attn, "gate", None) is not None:
        raise ValueError("Gated attention blocks are not supported by the filter.")
    qkv = attn.qkv
    if not isinstance(qkv, nn.Linear) or qkv.in_features != embed_dim:
        raise ValueError(
            f"block.attn.qkv must be nn.Linear({embed_dim}, ...), got {qkv}."
        )
    if qkv.out_features != 3 * attn.num_heads * attn.head_dim:
        raise ValueError(
            f"block.attn.qkv has {qkv.out_features} outputs, expected "
            f"3 * num_heads * head_dim = {3 * attn.num_heads * attn.head_dim}."
        )


def _layer_norm_eps(block: nn.Module) -> float:
    """The eps of the block's first norm (checked to exist), else timm ViTs' 1e-6."""
    eps = getattr(block.norm1, "eps", 1e-6)
    return float(eps)
