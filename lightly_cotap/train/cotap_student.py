"""The network of the CoTAP recipe: backbone plus patch and CLS projection heads."""

from __future__ import annotations

from torch import Tensor, nn

from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer
from lightly_cotap.models.modules.heads import (
    CoTAPClsProjectionHead,
    CoTAPPatchProjectionHead,
)


class CoTAPStudent(nn.Module):
    """Backbone plus patch and CLS projection heads (the student or the teacher).

    Attributes:
        backbone: The CoTAP vision transformer.
        patch_head: Patch projection head (prototype scores per patch).
        cls_head: CLS projection head.
    """

    def __init__(
        self,
        backbone: CoTAPVisionTransformer,
        patch_head: CoTAPPatchProjectionHead,
        cls_head: CoTAPClsProjectionHead,
    ) -> None:
        """Initializes the CoTAPStudent from its parts.

        Args:
            backbone: The CoTAP vision transformer.
            patch_head: Patch projection head.
            cls_head: CLS projection head.
        """
        super().__init__()
        self.backbone = backbone
        self.patch_head = patch_head
        self.cls_head = cls_head

    def forward(
        self,
        images: Tensor,
        *,
        return_fg_mask: bool = False,
        return_bank_features: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Runs backbone and heads.

        Args:
            images: Normalised images. Shape: (N, 3, H, W).
            return_fg_mask: Also return the foreground mask.
            return_bank_features: Also return the prototype-bank features.

        Returns:
            ``(patch_scores (N, h, w, K_patch), cls_scores (N, K_cls), fg_mask (N, h,
            w) | None, bank_features (N, D * k * k) | None)``.
        """
        out = self.backbone(
            images,
            return_fg_mask=return_fg_mask,
            return_bank_features=return_bank_features,
        )
        patch: Tensor = self.patch_head(out.dense)
        cls: Tensor = self.cls_head(out.cls)
        return patch, cls, out.fg_mask, out.bank_features
