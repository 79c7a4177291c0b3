"""mmseg backbone that runs the plugin's CoTAP vision transformer.

Over 400 lines: one backbone class whose options (architecture from the checkpoint,
frozen probing, layer ids for learning-rate decay) are each documented in full.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightly_cotap.mmseg.init_checkpoint import (
    check_architecture,
    exported_backbone_cfg,
    read_checkpoint,
    select_mmengine_prefix,
    validate_init_cfg,
)
from lightly_cotap.models.checkpoints import (
    CheckpointLoadReport,
    load_backbone_state_dict,
)
from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer

#: ``arch`` value that takes the architecture from the ``init_cfg`` checkpoint.
AUTO_ARCH = "auto"

#: Filter parameters that a segmentation loss can never train: the CLS branch's
#: output norm (the CLS feature is not used) and, with ``train_prototypes=False``,
#: the prototypes (detached in the forward, like the official code).
_UNUSED_IN_SEGMENTATION = ("filter.norm_out_cls.",)


@MODELS.register_module()
class CoTAPViT(BaseModule):  # type: ignore[misc]
    """CoTAP vision transformer as an mmsegmentation backbone.

    Builds the plugin's
    :class:`~lightly_cotap.models.cotap_vit.CoTAPVisionTransformer` (a timm ViT
    plus the object-aware filter of CoTAP [0]) and returns one feature map per
    entry of ``out_indices``. Levels before the last are the patch tokens after
    the given blocks (width D, no norm, like mmseg's ``VisionTransformer``); the
    last level is the model's dense output, i.e. the filter's features of width
    2D (or, with ``use_filter=False``, the final-normed tokens of width D), so
    the features are exactly those of the plugin model. All levels have stride
    p (16): use mmseg's ``MultiLevelNeck`` to build a pyramid for UPerNet.

    Weights: ``init_cfg=dict(type='Pretrained', checkpoint=PATH)`` (optionally
    with mmengine's ``prefix``) loads, through the project's checkpoint mapper,
    any of: a ``python -m lightly_cotap.export`` file (``timm`` or ``mmseg``
    format), a Lightning / official CoTAP checkpoint, or a plain timm / DINO /
    iBOT ViT checkpoint (for baselines; use ``use_filter=False`` with those).
    Position embeddings trained at another image size are resampled to
    ``img_size`` (timm's ``resample_abs_pos_embed``; the load log names both
    grids). Shape mismatches, unknown keys and missing files raise instead of the
    warnings of mmengine's generic loader; an exported checkpoint of another
    architecture raises naming every differing field and the config key that
    fixes it.

    Architecture: ``arch`` is a timm name, changed by ``timm_kwargs`` (e.g. the
    demo's ``arch='vit_tiny_patch16_224', timm_kwargs=dict(patch_size=8,
    embed_dim=96, depth=4)``). ``arch='auto'`` takes name, ``timm_kwargs`` and
    the filter settings from the ``meta`` of the exported ``init_cfg``
    checkpoint (``meta['mmseg_backbone']``); explicitly set ``use_filter`` /
    ``num_prototypes`` / ``prototype_size`` / ``timm_kwargs`` must agree with it.

    Frozen backbone (linear probing, ``frozen=True``): all parameters get
    ``requires_grad=False``, the ViT stays in eval mode (no drop path / dropout)
    even when the segmentor is in train mode, and the forward runs under
    ``torch.no_grad()``. ``train()`` raises if anything re-enabled gradients of
    the backbone, :class:`~lightly_cotap.mmseg.engine.FrozenBackboneCheckHook`
    (in every linear config) checks before training and after the first step
    that the optimiser did not change the backbone, and the layer-decay
    optimiser constructor refuses a frozen backbone.

    - [0]: Wen et al., Semantic Concentration for Self-Supervised Dense
      Representations Learning, 2025, https://arxiv.org/abs/2509.09429

    Attributes:
        model: The wrapped CoTAPVisionTransformer.
        out_indices: Normalised block indices of the outputs (last = depth - 1).
        frozen: Whether the backbone is frozen.
    """

    def __init__(
        self,
        arch: str = "vit_small_patch16_224",
        img_size: int | Sequence[int] = 224,
        out_indices: int | Sequence[int] = -1,
        use_filter: bool | None = None,
        num_prototypes: int | None = None,
        prototype_size: int | None = None,
        train_prototypes: bool = False,
        conv_stem: bool | None = None,
        frozen: bool = False,
        drop_path_rate: float = 0.0,
        timm_kwargs: Mapping[str, Any] | None = None,
        pretrained: str | None = None,
        init_cfg: Mapping[str, Any] | None = None,
    ) -> None:
        """Initializes the backbone.

        Args:
            arch: timm ViT name (e.g. "vit_small_patch16_224",
                "vit_base_patch16_224"), built without downloading weights; or
                "auto": the architecture of the exported ``init_cfg`` checkpoint.
            img_size: Image size of the position-embedding grid, usually the
                training crop size. Other input sizes work (the embedding is
                resampled on the fly).
            out_indices: Block indices of the output levels, increasing; negative
                values count from the end. The last one must be the last block
                (-1 or depth - 1): that level carries the filtered features.
            use_filter: Build the object-aware filter (last level 2D wide).
                None: True, or the checkpoint's with ``arch="auto"``.
            num_prototypes: Number of filter prototypes (must match the
                checkpoint). None: 64, or the checkpoint's with ``arch="auto"``.
            prototype_size: Spatial size of the prototypes (must match). None: 3,
                or the checkpoint's with ``arch="auto"``.
            train_prototypes: Let the segmentation loss train the prototypes.
            conv_stem: Convolutional patch embedding
                (:class:`~lightly_cotap.models.modules.conv_stem.ConvStem`). None:
                False, or the checkpoint's with ``arch="auto"``.
            frozen: Freeze the whole backbone (linear probing).
            drop_path_rate: Stochastic depth rate for fine-tuning.
            timm_kwargs: Further ``timm.create_model`` arguments (e.g.
                ``dict(patch_size=8, embed_dim=96, depth=4)`` or
                ``dict(reg_tokens=4)``).
            pretrained: Deprecated mmseg-style shortcut for
                ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)``.
            init_cfg: None (random init) or ``dict(type='Pretrained',
                checkpoint=..., prefix=None)``.

        Raises:
            FileNotFoundError: If ``arch="auto"`` and the checkpoint is missing.
            ValueError: If an argument is invalid.
        """
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError("Set either pretrained or init_cfg, not both.")
            init_cfg = dict(type="Pretrained", checkpoint=pretrained)
        if init_cfg is not None:
            validate_init_cfg(init_cfg)
        super().__init__(init_cfg=dict(init_cfg) if init_cfg is not None else None)
        if drop_path_rate < 0 or drop_path_rate >= 1:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")
        size = _to_size(img_size)
        extra = dict(timm_kwargs or {})
        if arch == AUTO_ARCH:
            if init_cfg is None:
                raise ValueError(
                    "CoTAPViT(arch='auto') takes the architecture from the "
                    "init_cfg checkpoint, but init_cfg is not set."
                )
            exported = exported_backbone_cfg(str(init_cfg["checkpoint"]))
            arch = exported["arch"]
            extra = {**exported["timm_kwargs"], **extra}
            # Explicit settings win; a disagreement fails in check_architecture.
            if use_filter is None:
                use_filter = bool(exported["use_filter"])
            if num_prototypes is None:
                num_prototypes = int(exported["num_prototypes"])
            if prototype_size is None:
                prototype_size = int(exported["prototype_size"])
            if conv_stem is None:
                conv_stem = bool(exported.get("conv_stem", False))
        self.model = CoTAPVisionTransformer(
            arch,
            use_filter=True if use_filter is None else use_filter,
            num_prototypes=64 if num_prototypes is None else num_prototypes,
            prototype_size=3 if prototype_size is None else prototype_size,
            train_prototypes=train_prototypes,
            img_size=size,
            conv_stem=bool(conv_stem),
            drop_path_rate=drop_path_rate,
            **extra,
        )
        self.arch = arch
        self.img_size = size
        self.out_indices = _normalize_out_indices(out_indices, self.depth)
        self.frozen = frozen
        # Parameters that segmentation cannot train would make DDP fail
        # ("parameters that did not receive grad"); exclude them.
        for name, param in self.model.named_parameters():
            if name.startswith(_UNUSED_IN_SEGMENTATION) or (
                name == "filter.prototypes" and not train_prototypes
            ):
                param.requires_grad_(False)
        if frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    # -- properties ------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        return len(self.model.vit.blocks)

    @property
    def embed_dim(self) -> int:
        """Token width D."""
        return self.model.embed_dim

    @property
    def out_channels(self) -> list[int]:
        """Channels of the output levels: D, ..., D, then 2D with the filter."""
        return [self.embed_dim] * (len(self.out_indices) - 1) + [self.model.out_dim]

    @property
    def num_layers(self) -> int:
        """Number of layer ids of :meth:`get_layer_id` (depth + 2)."""
        return self.depth + 2

    def get_layer_id(self, name: str) -> int:
        """Layer id of a parameter for layer-wise learning-rate decay.

        0 = embeddings (patch / position embedding, CLS and register tokens),
        i + 1 = block i, depth = the filter (it reuses the last block),
        depth + 1 = everything after the backbone (final norm, heads).

        Args:
            name: Parameter name relative to this backbone (e.g.
                "model.vit.blocks.3.attn.qkv.weight").

        Returns:
            The layer id in [0, depth + 1].
        """
        parts = name.split(".")
        if parts[:2] == ["model", "vit"] and len(parts) > 2:
            if parts[2] in ("cls_token", "reg_token", "pos_embed", "patch_embed"):
                return 0
            if parts[2] == "blocks":
                return int(parts[3]) + 1
        if parts[:2] == ["model", "filter"]:
            return self.depth
        return self.depth + 1

    # -- weights ---------------------------------------------------------------

    def init_weights(self) -> None:
        """Loads the ``init_cfg`` checkpoint (timm init is kept without one).

        Raises:
            FileNotFoundError: If the checkpoint file does not exist.
            ValueError: If the checkpoint does not fit this configuration.
        """
        if self.init_cfg is not None and not bool(getattr(self, "_is_init", False)):
            report = self.load_checkpoint(
                self.init_cfg["checkpoint"], prefix=self.init_cfg.get("prefix")
            )
            print_log(
                f"CoTAPViT loaded {self.init_cfg['checkpoint']}:\n{report.summary()}",
                logger="current",
            )
        elif self.init_cfg is None and self.frozen:
            print_log(
                "CoTAPViT is frozen but has no init_cfg checkpoint: probing randomly "
                "initialised features.",
                logger="current",
                level=logging.WARNING,
            )
        self._is_init = True

    def load_checkpoint(
        self, checkpoint: str | os.PathLike[str], prefix: str | None = None
    ) -> CheckpointLoadReport:
        """Loads a checkpoint file or URL into the backbone (strict).

        Args:
            checkpoint: Local path, or a URL / ``open-mmlab://`` style name
                (fetched by mmengine's ``CheckpointLoader``).
            prefix: mmengine-style prefix: only keys that start with it are used,
                with the prefix removed (e.g. "backbone."). None = auto-detect.

        Returns:
            The mapper's report (loaded / ignored / resampled keys).

        Raises:
            FileNotFoundError: If a local checkpoint does not exist.
            ValueError: If the checkpoint does not fit this configuration.
        """
        path = os.fspath(checkpoint)
        loaded = read_checkpoint(path)
        if prefix:
            loaded = select_mmengine_prefix(loaded, prefix, path)
        check_architecture(loaded, path, self.model.get_meta(), self._describe())
        try:
            report = load_backbone_state_dict(self.model, loaded, strict=True)
        except ValueError as err:
            raise ValueError(
                f"Checkpoint '{path}' does not fit the backbone configured as "
                f"{self._describe()}:\n{err}"
            ) from err
        if self.model.filter is not None and not self.model.prototypes_initialized:
            print_log(
                f"'{path}' has no object-aware filter weights: the filter is randomly "
                "initialised. For a plain ViT baseline use use_filter=False.",
                logger="current",
                level=logging.WARNING,
            )
        return report

    def _describe(self) -> str:
        return (
            f"CoTAPViT(arch={self.arch!r}, embed_dim={self.embed_dim}, "
            f"depth={self.depth}, patch_size={self.model.patch_size}, "
            f"use_filter={self.model.use_filter}, "
            f"num_prototypes={self.model.num_prototypes}, "
            f"prototype_size={self.model.prototype_size})"
        )

    # -- forward ---------------------------------------------------------------

    def train(self, mode: bool = True) -> CoTAPViT:
        """Sets the train mode; a frozen backbone stays in eval mode.

        Args:
            mode: Train (True) or eval (False) mode.

        Returns:
            This backbone.

        Raises:
            RuntimeError: If the backbone is frozen but has trainable parameters.
        """
        super().train(mode)
        if self.frozen:
            self.model.eval()
            trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
            if trainable:
                raise RuntimeError(
                    "CoTAPViT(frozen=True) has parameters with requires_grad=True "
                    f"({trainable[:5]}{' ...' if len(trainable) > 5 else ''}): "
                    "something unfroze the backbone, so the optimiser would update "
                    "it. Use frozen=False for fine-tuning."
                )
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Computes the feature maps of the output levels.

        Images whose size is not a multiple of the patch size p are zero-padded
        at the bottom / right.

        Args:
            x: Normalised images. Shape: (B, 3, H, W).

        Returns:
            One map per ``out_indices`` entry. Shapes: (B, D, ceil(H / p),
            ceil(W / p)) and, last, (B, out_dim, ceil(H / p), ceil(W / p)).
        """
        if self.frozen:
            with torch.no_grad():
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x: Tensor) -> tuple[Tensor, ...]:
        p = self.model.patch_size
        pad_h, pad_w = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        h, w = x.shape[-2] // p, x.shape[-1] // p
        captured: dict[int, Tensor] = {}
        handles: list[RemovableHandle] = []
        for index in self.out_indices[:-1]:
            handles.append(
                self.model.vit.blocks[index].register_forward_hook(
                    _capture(captured, index)
                )
            )
        try:
            dense = self.model(x).dense.permute(0, 3, 1, 2)  # mmseg: (B, D, h, w)
        finally:
            for handle in handles:
                handle.remove()
        npt = self.model.num_prefix_tokens
        outs = [
            captured[i][:, npt:].transpose(1, 2).reshape(x.shape[0], -1, h, w)
            for i in self.out_indices[:-1]
        ]
        outs.append(dense)
        return tuple(outs)


def _capture(store: dict[int, Tensor], index: int) -> Any:
    def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
        store[index] = output

    return hook


def _to_size(img_size: int | Sequence[int]) -> int | tuple[int, int]:
    if isinstance(img_size, int):
        return img_size
    size = tuple(int(s) for s in img_size)
    if len(size) != 2:
        raise ValueError(f"img_size must be an int or (H, W), got {img_size!r}.")
    return (size[0], size[1])


def _normalize_out_indices(out_indices: int | Sequence[int], depth: int) -> list[int]:
    indices = [out_indices] if isinstance(out_indices, int) else list(out_indices)
    if not indices or any(not -depth <= i < depth for i in indices):
        raise ValueError(
            f"out_indices must be non-empty block indices in [-{depth}, {depth}), got "
            f"{out_indices!r}."
        )
    normalized = [i % depth for i in indices]
    if any(b <= a for a, b in zip(normalized, normalized[1:])):
        raise ValueError(f"out_indices must be increasing, got {out_indices!r}.")
    if normalized[-1] != depth - 1:
        raise ValueError(
            f"The last of out_indices must be the last block ({depth - 1} or -1), "
            f"whose level carries the filtered features; got {out_indices!r}."
        )
    return normalized
