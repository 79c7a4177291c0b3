"""CoTAP vision transformer: a timm ViT with the object-aware filter.

Over 400 lines: one class whose public methods (forward, prototype initialisation,
checkpoint loading, rebuilding from an export's meta) are each documented in full.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from lightly.utils import dist
from timm.models import is_model, is_model_in_modules
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from lightly_cotap.models.checkpoint_files import load_checkpoint_file
from lightly_cotap.models.checkpoints import (
    CheckpointLoadReport,
    load_backbone_state_dict,
)
from lightly_cotap.models.cotap_vit_meta import (
    META_FORMAT_VERSION,
    check_meta,
    timm_overrides,
    vit_structure,
)
from lightly_cotap.models.foreground import foreground_mask_from_attention
from lightly_cotap.models.kmeans import spherical_kmeans
from lightly_cotap.models.modules.conv_stem import ConvStem, add_conv_stem
from lightly_cotap.models.modules.object_aware_filter import ObjectAwareFilter
from lightly_cotap.models.modules.timm_attention import cls_to_patch_attention


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

    Runs the timm ViT through its public ``forward_features`` (patch embedding with
    dynamic image size, position embedding, register tokens, blocks) and, with
    ``use_filter=True``, the :class:`~lightly_cotap.models.modules.ObjectAwareFilter`
    on the outputs of the last block, which doubles the feature width to 2D. Without
    the filter it returns the plain ViT features of width D.

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
                or a timm ``VisionTransformer`` instance built with
                ``dynamic_img_size=True``. An instance is modified in place: its
                classifier is removed and, with the filter, its final norm is
                replaced by ``nn.Identity``.
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
        # Set by a forward pre-hook of the last block (registered once: a hook added
        # per call would break torch.compile graphs).
        self._last_block_input: Tensor | None = None
        self.vit.blocks[-1].register_forward_pre_hook(self._keep_last_block_input)
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
        h, w = images.shape[2] // self.patch_size, images.shape[3] // self.patch_size
        npt = self.num_prefix_tokens
        x = self.vit.forward_features(images)  # final norm: Identity with filter
        # The input of the last block gives the foreground mask and the bank samples.
        before_last = self._last_block_input
        self._last_block_input = None
        assert before_last is not None

        bank_features = None
        if return_bank_features:
            patch_map = (
                before_last[:, npt:].detach().transpose(1, 2).unflatten(2, (h, w))
            )
            k = self.prototype_size
            bank_features = F.adaptive_avg_pool2d(patch_map, (k, k)).flatten(1)
        cls_attention = None
        fg_mask = None
        if return_fg_mask:
            cls_attention = cls_to_patch_attention(
                self.vit.blocks[-1], before_last, npt
            )
            fg_mask = foreground_mask_from_attention(cls_attention, grid_size=(h, w))

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
        if dist.rank() == 0:
            centers, _ = spherical_kmeans(
                samples,
                num_clusters=flt.num_prototypes,
                num_iters=num_iters,
                generator=generator,
                progress=progress,
            )
            flt.set_prototypes(centers.to(flt.prototypes.dtype))
        if dist.world_size() > 1:
            # lightly.utils.dist has gather but no broadcast.
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
        files (see :func:`lightly_cotap.models.checkpoints.load_backbone_state_dict`
        for the rules). A checkpoint without filter weights (e.g. DINO) leaves the
        filter freshly initialised; initialise the prototypes with
        :meth:`init_prototypes_from_bank`.

        Args:
            checkpoint: Path or loaded checkpoint dict.
            strict: Raise on missing / unexpected keys.
            prefix: Backbone key prefix (auto-detected if None).
            checkpoint_key: Top-level sub-dict (auto-detected if None).
            weights_only: Use ``torch.load(weights_only=True)`` for files.

        Returns:
            A :class:`~lightly_cotap.models.checkpoints.CheckpointLoadReport`.

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
        return {
            "format_version": META_FORMAT_VERSION,
            "arch": self.arch,
            **vit_structure(self.vit),
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
        (:func:`~lightly_cotap.models.cotap_vit_meta.timm_overrides`) when the
        architecture name is known, else a timm ``VisionTransformer``.

        Args:
            meta: The architecture description.

        Returns:
            The model with freshly initialised weights.

        Raises:
            ValueError: If the meta dict is incomplete or of an unknown version.
        """
        check_meta(meta)
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

    def _keep_last_block_input(self, block: nn.Module, args: tuple[Tensor]) -> None:
        self._last_block_input = args[0]

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
    if not vit.dynamic_img_size:
        # Multi-crop runs crops of several sizes through one ViT; timm has no public
        # way to switch an existing patch embedding to dynamic sizes.
        raise ValueError(
            "The ViT must accept any image size: build it with "
            "timm.create_model(..., dynamic_img_size=True)."
        )
    # Classifier parts are not part of the backbone.
    vit.reset_classifier(0, global_pool="token")
    if not isinstance(vit.fc_norm, nn.Identity):
        vit.fc_norm = nn.Identity()
