"""CoTAP vision transformer: a timm ViT with the object-aware filter."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightly_cotap.models.modules.conv_stem import ConvStem, add_conv_stem
from lightly_cotap.models.modules.object_aware_filter import ObjectAwareFilter
from lightly_cotap.models.utils import (
    CheckpointLoadReport,
    foreground_mask_from_attention,
    load_backbone_state_dict,
    load_checkpoint_file,
    spherical_kmeans,
)

#: Version of the ``meta`` dict written by :meth:`CoTAPVisionTransformer.get_meta`.
META_FORMAT_VERSION = 1

#: The ``timm.create_model`` argument that sets each structural field of the meta
#: dict (``layer_scale`` is set through ``init_values``).
TIMM_ARGUMENTS: dict[str, str] = {
    "patch_size": "patch_size",
    "embed_dim": "embed_dim",
    "depth": "depth",
    "num_heads": "num_heads",
    "mlp_ratio": "mlp_ratio",
    "qkv_bias": "qkv_bias",
    "num_reg_tokens": "reg_tokens",
    "no_embed_class": "no_embed_class",
    "layer_scale": "init_values",
}

#: timm name whose defaults are those of timm's plain ``VisionTransformer``; stands
#: in for a meta dict without a model name.
GENERIC_ARCH = "vit_base_patch16_224"


@dataclass
class CoTAPViTOutput:
    """Outputs of :class:`CoTAPVisionTransformer`.

    Attributes:
        cls: CLS feature. Shape: (B, out_dim).
        dense: Channel-last dense patch features. Shape: (B, H / p, W / p, out_dim).
        fg_mask: Foreground mask from the last block's CLS attention, if requested.
            Shape: (B, H / p, W / p), dtype bool.
        cls_attention: Head-averaged last-block attention of the CLS token to the
            patches (softmax over all tokens, then the patch columns), if the mask was
            requested. Shape: (B, H / p * W / p).
        bank_features: Output of the block before the last, adaptive-average-pooled
            to k x k and flattened (detached), for the prototype bank, if requested.
            Shape: (B, D * k * k).
    """

    cls: Tensor
    dense: Tensor
    fg_mask: Tensor | None = None
    cls_attention: Tensor | None = None
    bank_features: Tensor | None = None


#: timm modules whose models are ``VisionTransformer`` instances.
VIT_MODULES = ("vision_transformer", "vision_transformer_hybrid", "deit")


def vit_name_problem(name: str) -> str | None:
    """Says why a timm model name cannot be a CoTAP backbone.

    Args:
        name: A timm model name (a ``.tag`` suffix is allowed).

    Returns:
        ``None`` if ``name`` is a timm ``VisionTransformer``, else the problem
        (e.g. ``"is not a timm VisionTransformer; ..."`` for ``resnet50``).
    """
    from timm.models import is_model, is_model_in_modules

    if not is_model(name):
        return (
            "is not a timm model name (e.g. vit_small_patch16_224; "
            "timm.list_models('vit_*') lists them)"
        )
    if not is_model_in_modules(name, VIT_MODULES):
        return (
            "is not a timm VisionTransformer; CoTAP needs a ViT such as "
            "vit_small_patch16_224"
        )
    return None


class CoTAPVisionTransformer(nn.Module):
    """Vision transformer of CoTAP [0] over any timm ``VisionTransformer``.

    Runs the timm ViT (patch embedding with dynamic image size, position embedding,
    register tokens, blocks) and, with ``use_filter=True``, the
    :class:`~lightly_cotap.models.modules.ObjectAwareFilter` on the outputs of the last
    block, which doubles the feature width to 2D. Without the filter it returns the
    plain ViT features of width D.

    Final norm: CoTAP's ViT ('depth' variant of the official code) has no final
    LayerNorm; the filter's output norms take its place. With the filter, timm's
    ``vit.norm`` is therefore replaced by ``nn.Identity`` (a checkpoint's ``norm.*``
    keys are reported as ignored when loading). Without the filter, timm's final norm
    is applied, i.e. the features are those of a standard timm/DINO ViT.

    Image normalisation is NOT part of the model (unlike the official code): pass
    images normalised with the ImageNet mean / std, as Lightly's transforms do.

    The model works with ``copy.deepcopy`` and ``lightly.models.utils.update_momentum``
    for an EMA teacher (the filter shares the last block's weights by reference, and a
    deep copy keeps that sharing).

    - [0]: Wen et al., Semantic Concentration for Self-Supervised Dense
      Representations Learning, 2025, https://arxiv.org/abs/2509.09429

    Attributes:
        vit: The timm ``VisionTransformer``.
        filter: The object-aware filter, or None without it.
        use_filter: Whether the filter is used.

    Examples:
        >>> model = CoTAPVisionTransformer("vit_small_patch16_224")
        >>> model.load_pretrained("dino_deitsmall16_pretrain.pth")  # local file
        >>> out = model(images, return_fg_mask=True)
        >>> out.cls.shape, out.dense.shape, out.fg_mask.shape
        (torch.Size([B, 768]), torch.Size([B, 14, 14, 768]), torch.Size([B, 14, 14]))
    """

    def __init__(
        self,
        vit: str | nn.Module = "vit_small_patch16_224",
        *,
        use_filter: bool = True,
        num_prototypes: int = 64,
        prototype_size: int = 3,
        train_prototypes: bool = False,
        img_size: int | tuple[int, int] = 224,
        conv_stem: bool = False,
        **timm_kwargs: Any,
    ) -> None:
        """Initializes the CoTAPVisionTransformer.

        Args:
            vit: A timm model name (built with ``pretrained=False``, never downloads)
                or a timm ``VisionTransformer`` instance. An instance is modified in
                place: dynamic image size is enabled, its classifier is removed and,
                with the filter, its final norm is replaced by ``nn.Identity``.
            use_filter: Use the object-aware filter (output width 2D instead of D).
            num_prototypes: Number M of object prototypes (paper: 64).
            prototype_size: Spatial size k of the prototypes (paper: 3).
            train_prototypes: Let the main losses back-propagate into the prototypes
                (default False, like the official code; see ObjectAwareFilter).
            img_size: Image size of the position-embedding grid when ``vit`` is a
                name. Other image sizes work too (the embedding is resampled).
            conv_stem: Replace the patch projection by a
                :class:`~lightly_cotap.models.modules.conv_stem.ConvStem` (strided
                3 x 3 convolutions; trains faster from scratch on small data). A
                ``vit`` instance that already has one keeps it.
            **timm_kwargs: Extra arguments for ``timm.create_model`` when ``vit`` is a
                name (e.g. ``drop_path_rate=0.1`` or ``reg_tokens=4``).

        Raises:
            ValueError: If the ViT is not supported or an argument is invalid.
        """
        super().__init__()
        import timm
        from timm.models.vision_transformer import VisionTransformer

        if isinstance(vit, str):
            problem = vit_name_problem(vit)
            if problem is not None:
                raise ValueError(f"vit {vit!r} {problem}.")
            for key in ("pretrained", "num_classes", "dynamic_img_size"):
                if key in timm_kwargs:
                    raise ValueError(f"timm_kwargs must not set {key!r}.")
            arch: str | None = vit
            vit = timm.create_model(
                vit,
                pretrained=False,
                num_classes=0,
                dynamic_img_size=True,
                img_size=img_size,
                **timm_kwargs,
            )
        else:
            if timm_kwargs:
                raise ValueError(
                    f"timm_kwargs {sorted(timm_kwargs)} are only used when vit is a "
                    "model name."
                )
            pretrained_cfg = getattr(vit, "pretrained_cfg", None) or {}
            arch = pretrained_cfg.get("architecture")
        if not isinstance(vit, VisionTransformer):
            raise ValueError(
                "vit must be a timm VisionTransformer (or the name of one), got "
                f"{type(vit).__name__}."
            )
        if conv_stem and not isinstance(vit.patch_embed.proj, ConvStem):
            add_conv_stem(vit)
        _prepare_vit(vit)
        self.vit = vit
        self.arch = arch
        self.use_filter = use_filter
        self.filter: ObjectAwareFilter | None = None
        if use_filter:
            self.vit.norm = nn.Identity()
            self.filter = ObjectAwareFilter(
                block=self.vit.blocks[-1],
                embed_dim=self.embed_dim,
                num_prototypes=num_prototypes,
                prototype_size=prototype_size,
                train_prototypes=train_prototypes,
            )
        elif num_prototypes <= 0 or prototype_size <= 0 or prototype_size % 2 == 0:
            raise ValueError(
                "num_prototypes must be positive and prototype_size positive and odd, "
                f"got {num_prototypes} and {prototype_size}."
            )
        self.num_prototypes = num_prototypes
        self.prototype_size = prototype_size

    # -- properties ----------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        """Token width D of the ViT."""
        return int(self.vit.embed_dim)

    @property
    def out_dim(self) -> int:
        """Width of the outputs: 2D with the filter, D without."""
        return 2 * self.embed_dim if self.use_filter else self.embed_dim

    @property
    def conv_stem(self) -> bool:
        """Whether the patch embedding is a convolutional stem."""
        return isinstance(self.vit.patch_embed.proj, ConvStem)

    @property
    def patch_size(self) -> int:
        """Patch size p in pixels."""
        return int(self.vit.patch_embed.patch_size[0])

    @property
    def num_prefix_tokens(self) -> int:
        """Number of prefix tokens (CLS + register tokens)."""
        return int(self.vit.num_prefix_tokens)

    @property
    def bank_dim(self) -> int:
        """Width D * k * k of a prototype-bank sample."""
        return self.embed_dim * self.prototype_size**2

    @property
    def prototypes(self) -> nn.Parameter:
        """The filter's prototypes. Shape: (M, D, k, k).

        Raises:
            ValueError: If the model has no filter.
        """
        return self._require_filter().prototypes

    @property
    def prototypes_initialized(self) -> bool:
        """Whether the prototypes were set by k-means or loaded from a checkpoint."""
        return self.filter is not None and self.filter.is_initialized

    # -- forward -------------------------------------------------------------------

    def forward(
        self,
        images: Tensor,
        *,
        return_fg_mask: bool = False,
        return_bank_features: bool = False,
    ) -> CoTAPViTOutput:
        """Computes CLS and dense features.

        Args:
            images: Normalised images. Shape: (B, C, H, W), H and W divisible by the
                patch size.
            return_fg_mask: Also return the foreground mask (and the CLS attention it
                comes from): last-block CLS -> patch attention averaged over heads,
                7 x 7 Gaussian blur with sigma 0.6, keeping 60% of the mass.
            return_bank_features: Also return the pooled features of the block before
                the last for the prototype bank (needs the filter).

        Returns:
            A :class:`CoTAPViTOutput`.

        Raises:
            ValueError: If the images have the wrong shape.
        """
        self._check_images(images)
        if return_bank_features:
            self._require_filter()
        vit = self.vit
        x = vit.patch_embed(images)  # (B, h, w, D): dynamic image size -> NHWC
        h, w = x.shape[1], x.shape[2]
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        blocks = list(vit.blocks)
        use_checkpointing = (
            getattr(vit, "grad_checkpointing", False)
            and self.training
            and torch.is_grad_enabled()
        )
        for block in blocks[:-1]:
            if use_checkpointing:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)

        npt = self.num_prefix_tokens
        bank_features = None
        if return_bank_features:
            patch_map = self._to_map(x[:, npt:].detach(), h, w)
            k = self.prototype_size
            bank_features = F.adaptive_avg_pool2d(patch_map, (k, k)).flatten(1)

        last = blocks[-1]
        cls_attention = None
        fg_mask = None
        if return_fg_mask:
            cls_attention = _cls_to_patch_attention(last, x, npt)
            fg_mask = foreground_mask_from_attention(cls_attention, grid_size=(h, w))
        x = last(x)
        x = vit.norm(x)  # Identity with the filter

        cls = x[:, 0]
        dense = self._to_map(x[:, npt:], h, w)
        if self.filter is not None:
            cls, dense = self.filter(cls, dense)
        return CoTAPViTOutput(
            cls=cls,
            dense=dense.permute(0, 2, 3, 1),  # channel-last (B, h, w, D)
            fg_mask=fg_mask,
            cls_attention=cls_attention,
            bank_features=bank_features,
        )

    # -- prototypes ----------------------------------------------------------------

    @torch.no_grad()
    def init_prototypes_from_bank(
        self,
        samples: Tensor,
        num_iters: int = 300,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> None:
        """Initialises the prototypes by spherical k-means on bank samples.

        As in CoTAP [0]: the M cluster centers (unit norm) of the L2-normalised,
        flattened k x k pooled block features become the prototypes. Under
        ``torch.distributed``, rank 0 clusters and broadcasts the result.

        Args:
            samples: Bank samples, e.g. ``PrototypeBank.samples``.
                Shape: (N, D * k * k) with N >= M.
            num_iters: Maximum k-means iterations.
            generator: Optional random generator for the k-means seeding.
            progress: Show a progress bar.

        Raises:
            ValueError: If the model has no filter or the samples have a wrong shape.
        """
        flt = self._require_filter()
        if samples.ndim != 2 or samples.shape[1] != self.bank_dim:
            raise ValueError(
                f"samples must have shape (N, {self.bank_dim}), got "
                f"{tuple(samples.shape)}."
            )
        if samples.shape[0] < flt.num_prototypes:
            raise ValueError(
                f"Need at least num_prototypes={flt.num_prototypes} samples, got "
                f"{samples.shape[0]}."
            )
        distributed = (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        )
        if not distributed or torch.distributed.get_rank() == 0:
            centers, _ = spherical_kmeans(
                samples,
                num_clusters=flt.num_prototypes,
                num_iters=num_iters,
                generator=generator,
                progress=progress,
            )
            flt.set_prototypes(centers.to(flt.prototypes.dtype))
        if distributed:
            torch.distributed.broadcast(flt.prototypes.data, src=0)
            flt.mark_initialized()

    # -- checkpoints ---------------------------------------------------------------

    def load_pretrained(
        self,
        checkpoint: str | os.PathLike[str] | Mapping[str, Any],
        *,
        strict: bool = True,
        prefix: str | None = None,
        checkpoint_key: str | None = None,
        weights_only: bool = True,
    ) -> CheckpointLoadReport:
        """Loads weights from a checkpoint (file or loaded dict) without network access.

        Supports timm state dicts, DINO/iBOT backbone and training checkpoints,
        official CoTAP checkpoints, lightly-cotap exports and Lightning ``.ckpt``
        files (see :func:`lightly_cotap.models.utils.load_backbone_state_dict` for
        the rules). A checkpoint without filter weights (e.g. DINO) leaves the filter
        freshly initialised; initialise the prototypes with
        :meth:`init_prototypes_from_bank`.

        Args:
            checkpoint: Path or loaded checkpoint dict.
            strict: Raise on missing / unexpected keys.
            prefix: Backbone key prefix (auto-detected if None).
            checkpoint_key: Top-level sub-dict (auto-detected if None).
            weights_only: Use ``torch.load(weights_only=True)`` for files.

        Returns:
            A :class:`~lightly_cotap.models.utils.CheckpointLoadReport`.

        Raises:
            ValueError: On shape mismatches or (strict) missing / unexpected keys.
        """
        if not isinstance(checkpoint, Mapping):
            checkpoint = load_checkpoint_file(checkpoint, weights_only=weights_only)
        return load_backbone_state_dict(
            self,
            checkpoint,
            strict=strict,
            prefix=prefix,
            checkpoint_key=checkpoint_key,
        )

    def get_meta(self) -> dict[str, Any]:
        """Returns the architecture description stored with exported checkpoints.

        Returns:
            A dict of primitive values from which :meth:`from_meta` rebuilds the model.
        """
        vit = self.vit
        block = vit.blocks[0]
        attn = block.attn
        from timm.layers import LayerScale

        return {
            "format_version": META_FORMAT_VERSION,
            "arch": self.arch,
            "img_size": [int(s) for s in vit.patch_embed.img_size],
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": len(vit.blocks),
            "num_heads": int(attn.num_heads),
            "mlp_ratio": float(block.mlp.fc1.out_features) / self.embed_dim,
            "qkv_bias": attn.qkv.bias is not None,
            "num_reg_tokens": int(vit.num_reg_tokens),
            "no_embed_class": bool(vit.no_embed_class),
            "layer_scale": isinstance(block.ls1, LayerScale),
            "conv_stem": self.conv_stem,
            "use_filter": self.use_filter,
            "num_prototypes": self.num_prototypes,
            "prototype_size": self.prototype_size,
            "train_prototypes": self.filter is not None
            and self.filter.train_prototypes,
            "out_dim": self.out_dim,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> CoTAPVisionTransformer:
        """Builds an (untrained) model from a :meth:`get_meta` dict.

        Uses ``timm.create_model(meta["arch"], ...)`` with the stored structure
        (:func:`timm_overrides`) when the architecture name is known, else a timm
        ``VisionTransformer``.

        Args:
            meta: The architecture description.

        Returns:
            The model with freshly initialised weights.

        Raises:
            ValueError: If the meta dict is incomplete or of an unknown version.
        """
        required = (
            "format_version",
            "img_size",
            "patch_size",
            "embed_dim",
            "depth",
            "num_heads",
            "mlp_ratio",
            "qkv_bias",
            "num_reg_tokens",
            "no_embed_class",
            "layer_scale",
            "use_filter",
            "num_prototypes",
            "prototype_size",
        )
        missing = [k for k in required if k not in meta]
        if missing:
            raise ValueError(f"Checkpoint meta lacks {missing}.")
        if int(meta["format_version"]) > META_FORMAT_VERSION:
            raise ValueError(
                f"Checkpoint meta format_version {meta['format_version']} is newer "
                f"than this lightly-cotap version supports ({META_FORMAT_VERSION})."
            )
        import timm
        from timm.models.vision_transformer import VisionTransformer

        # The name's defaults (a plain VisionTransformer's without a name) plus what
        # differs from them, e.g. the train demo's patch size or a custom mlp_ratio.
        arch = meta.get("arch")
        options: dict[str, Any] = dict(
            num_classes=0,
            dynamic_img_size=True,
            img_size=tuple(meta["img_size"]),
            **timm_overrides(meta),
        )
        if arch:
            vit = timm.create_model(arch, pretrained=False, **options)
        else:
            vit = VisionTransformer(**options)
        model = cls(
            vit,
            use_filter=bool(meta["use_filter"]),
            num_prototypes=int(meta["num_prototypes"]),
            prototype_size=int(meta["prototype_size"]),
            train_prototypes=bool(meta.get("train_prototypes", False)),
            conv_stem=bool(meta.get("conv_stem", False)),
        )
        model.arch = arch
        return model

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike[str] | Mapping[str, Any],
        *,
        strict: bool = True,
    ) -> CoTAPVisionTransformer:
        """Rebuilds a model from a checkpoint written by ``lightly_cotap.export``.

        Both export formats load: ``timm`` (timm keys) and ``mmseg``
        (``backbone.model.*`` keys).

        Args:
            checkpoint: Path or loaded dict with ``meta`` and ``state_dict`` entries.
            strict: Raise on missing / unexpected keys.

        Returns:
            The model with the checkpoint's weights, in eval mode.

        Raises:
            ValueError: If the checkpoint has no ``meta`` or does not fit it.
        """
        if not isinstance(checkpoint, Mapping):
            checkpoint = load_checkpoint_file(checkpoint, weights_only=True)
        meta = checkpoint.get("meta")
        if not isinstance(meta, Mapping):
            raise ValueError(
                "The checkpoint has no 'meta' dict (it was not written by "
                "lightly_cotap.export). Build CoTAPVisionTransformer(<arch>, ...) and "
                "call load_pretrained(...) instead."
            )
        model = cls.from_meta(meta)
        # Auto-detected prefix: '' in the timm format, 'backbone.model.vit.' in the
        # mmseg format (both hold exactly one ViT).
        model.load_pretrained(checkpoint, strict=strict)
        return model.eval()

    # -- helpers -------------------------------------------------------------------

    def _require_filter(self) -> ObjectAwareFilter:
        if self.filter is None:
            raise ValueError(
                "This CoTAPVisionTransformer was built with use_filter=False and has "
                "no prototypes."
            )
        return self.filter

    def _check_images(self, images: Tensor) -> None:
        proj = self.vit.patch_embed.proj
        in_chans = int(getattr(proj, "image_channels", proj.in_channels))
        if images.ndim != 4:
            raise ValueError(
                f"images must have shape (B, {in_chans}, H, W), got "
                f"{tuple(images.shape)}."
            )
        if images.shape[1] != in_chans:
            raise ValueError(
                f"images must have {in_chans} channels, got shape "
                f"{tuple(images.shape)}."
            )
        p = self.patch_size
        if images.shape[2] % p != 0 or images.shape[3] % p != 0:
            raise ValueError(
                f"Image size {tuple(images.shape[2:])} is not divisible by the patch "
                f"size {p}."
            )

    def _to_map(self, tokens: Tensor, h: int, w: int) -> Tensor:
        """(B, h * w, D) patch tokens -> (B, D, h, w) map."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def timm_value(field: str, value: Any) -> Any:
    """The ``timm.create_model`` value of a structural meta field.

    Args:
        field: A key of :data:`TIMM_ARGUMENTS`.
        value: Its value in the meta dict.

    Returns:
        The value of the timm argument ``TIMM_ARGUMENTS[field]``.
    """
    if field == "layer_scale":
        return 1e-5 if value else None
    return value


def timm_overrides(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments of ``timm.create_model`` that rebuild the meta's ViT from its name.

    ``CoTAPVisionTransformer(meta["arch"], **timm_overrides(meta))`` (or, in mmseg,
    ``CoTAPViT(arch=..., timm_kwargs=...)``) rebuilds the exported ViT, e.g. the
    demo's ``vit_tiny_patch16_224`` with ``patch_size=8, embed_dim=96, depth=4``.
    Only the fields that differ from the name's defaults are returned. A meta dict
    without a name stands for a plain timm ``VisionTransformer``, whose defaults
    are those of :data:`GENERIC_ARCH`.

    Args:
        meta: A :meth:`CoTAPVisionTransformer.get_meta` dict.

    Returns:
        timm argument name -> value.

    Raises:
        ValueError: If a structural field is missing.
    """
    missing = [f for f in TIMM_ARGUMENTS if f not in meta]
    if missing:
        raise ValueError(f"Checkpoint meta lacks {missing}.")
    with torch.device("meta"):  # no memory, no initialisation cost
        default = CoTAPVisionTransformer(
            meta.get("arch") or GENERIC_ARCH, use_filter=False
        ).get_meta()
    return {
        TIMM_ARGUMENTS[f]: timm_value(f, meta[f])
        for f in TIMM_ARGUMENTS
        if meta[f] != default[f]
    }


def _prepare_vit(vit: Any) -> None:
    """Validates a timm ViT and configures it for dense CoTAP features."""
    if getattr(vit, "cls_token", None) is None:
        raise ValueError("The ViT needs a class token (timm class_token=True).")
    if not isinstance(vit.patch_drop, nn.Identity):
        raise ValueError("Patch dropout (patch_drop_rate > 0) is not supported.")
    patch_size = tuple(vit.patch_embed.patch_size)
    if patch_size[0] != patch_size[1]:
        raise ValueError(f"Only square patches are supported, got {patch_size}.")
    if not hasattr(vit.patch_embed, "proj") or not isinstance(
        vit.patch_embed.proj, nn.Conv2d
    ):
        raise ValueError("The ViT's patch_embed must have a Conv2d 'proj'.")
    # Dynamic image size: NHWC patch embedding + position-embedding resampling.
    if not vit.dynamic_img_size:
        from timm.layers import Format

        vit.dynamic_img_size = True
        vit.patch_embed.strict_img_size = False
        vit.patch_embed.flatten = False
        vit.patch_embed.output_fmt = Format.NHWC
    # Classifier parts are not part of the backbone.
    vit.reset_classifier(0, global_pool="token")
    if not isinstance(vit.fc_norm, nn.Identity):
        vit.fc_norm = nn.Identity()


def _cls_to_patch_attention(block: Any, x: Tensor, num_prefix_tokens: int) -> Tensor:
    """Head-averaged attention of the CLS token to the patches in a timm block.

    The softmax runs over all tokens (CLS, registers and patches) as in the block;
    the patch columns are returned. Shape: (B, N_patches).
    """
    attn = block.attn
    qkv: nn.Linear = attn.qkv
    attn_dim = qkv.out_features // 3
    bias = qkv.bias
    tokens = block.norm1(x)
    q = F.linear(
        tokens[:, 0], qkv.weight[:attn_dim], None if bias is None else bias[:attn_dim]
    ).unflatten(-1, (attn.num_heads, attn.head_dim))
    k = F.linear(
        tokens,
        qkv.weight[attn_dim : 2 * attn_dim],
        None if bias is None else bias[attn_dim : 2 * attn_dim],
    ).unflatten(-1, (attn.num_heads, attn.head_dim))
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = torch.einsum("bhd,bnhd->bhn", q, k) * float(attn.scale)
    probs = logits.float().softmax(dim=-1)
    attention: Tensor = probs[:, :, num_prefix_tokens:].mean(dim=1)
    return attention
