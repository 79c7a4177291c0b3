"""NT-Xent with an optional class-aware negative mask (semantic-pair pretraining)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from lightly.utils import dist
from torch import Tensor


class ClassAwareNTXentLoss(NTXentLoss):
    """Lightly's NT-Xent loss with an optional class-aware negative mask.

    For semantic-pair pretraining [0] the positive pair of SimCLR is two different
    images of the same class. Other pairs of the same class in the batch then act
    as negatives of the anchor ("false negatives"). Passing ``labels`` removes
    every candidate of the anchor's class from the denominator except its
    positive; without ``labels`` (the default, matching [0], which keeps the
    batch label-free) this is exactly :class:`~lightly.loss.NTXentLoss` [1].

    For anchor i with positive p(i) among the 2N (or 2N * world_size) candidates
    C(i) (the anchor itself excluded):

        l_i = -log( exp(s_(i, p(i)) / t)
                    / sum_(k in C(i), k = p(i) or y_k != y_i) exp(s_ik / t) )

    The mask is an extension of this plugin; [0] does not say how (or whether)
    it handles same-class negatives.

    - [0]: Alkhalefi et al., Enhancing Self-Supervised Learning with Semantic
      Pairs, 2025, https://arxiv.org/abs/2510.08722
    - [1]: SimCLR, 2020, https://arxiv.org/abs/2002.05709

    Attributes:
        temperature:
            Scale logits by the inverse of the temperature.
        memory_bank_size:
            Size of the memory bank as (num_features, dim); not supported together
            with ``labels`` (the bank stores no labels).
        gather_distributed:
            If True, negatives (and their labels) from all processes are gathered.

    Examples:
        >>> criterion = ClassAwareNTXentLoss(temperature=0.5)
        >>> (x, x_pos), labels = batch  # semantic pairs and their class
        >>> loss = criterion(model(x), model(x_pos), labels=labels)
    """

    def forward(
        self, out0: Tensor, out1: Tensor, *, labels: Tensor | None = None
    ) -> Tensor:
        """Computes the NT-Xent loss, masking same-class negatives if ``labels``.

        Args:
            out0:
                Output projections of the first images of the pairs.
                Shape: (batch_size, embedding_size)
            out1:
                Output projections of the second images of the pairs.
                Shape: (batch_size, embedding_size)
            labels:
                Integer class of every pair, or None for the plain NT-Xent loss.
                Shape: (batch_size,)

        Returns:
            The loss.

        Raises:
            ValueError: If ``labels`` is given together with a memory bank, or on
                inconsistent shapes.
        """
        if labels is None:
            loss: Tensor = super().forward(out0, out1)
            return loss
        if self.memory_bank.size[0] > 0:
            raise ValueError(
                "labels are not supported with a memory bank: the bank stores no "
                "labels. Use memory_bank_size=0."
            )
        if out0.ndim != 2 or out0.shape != out1.shape:
            raise ValueError(
                "out0 and out1 must both have shape (batch_size, embedding_size), "
                f"got {tuple(out0.shape)} and {tuple(out1.shape)}."
            )
        batch_size = out0.shape[0]
        if labels.shape != (batch_size,):
            raise ValueError(
                f"labels must have shape (batch_size,) = ({batch_size},), got "
                f"{tuple(labels.shape)}."
            )
        device = out0.device
        labels = labels.to(device)
        out0 = F.normalize(out0, dim=1)
        out1 = F.normalize(out1, dim=1)
        if self.gather_distributed and dist.world_size() > 1:
            out0_large = torch.cat(dist.gather(out0), 0)
            out1_large = torch.cat(dist.gather(out1), 0)
            labels_large = torch.cat(dist.gather(labels.contiguous()), 0)
            diag_mask = dist.eye_rank(batch_size, device=device)
            offset = dist.rank() * batch_size
        else:
            out0_large, out1_large, labels_large = out0, out1, labels
            diag_mask = torch.eye(batch_size, device=device, dtype=torch.bool)
            offset = 0

        same_class = labels[:, None] == labels_large[None, :]  # (n, m)
        # Cross-view blocks keep the positive; same-view blocks drop the anchor.
        cross_mask = same_class & ~diag_mask
        same_view_mask = same_class | diag_mask
        logits_00 = out0 @ out0_large.T / self.temperature
        logits_01 = out0 @ out1_large.T / self.temperature
        logits_10 = out1 @ out0_large.T / self.temperature
        logits_11 = out1 @ out1_large.T / self.temperature
        neg_inf = float("-inf")
        logits = torch.cat(
            [
                torch.cat(
                    [
                        logits_01.masked_fill(cross_mask, neg_inf),
                        logits_00.masked_fill(same_view_mask, neg_inf),
                    ],
                    dim=1,
                ),
                torch.cat(
                    [
                        logits_10.masked_fill(cross_mask, neg_inf),
                        logits_11.masked_fill(same_view_mask, neg_inf),
                    ],
                    dim=1,
                ),
            ],
            dim=0,
        )
        targets = torch.arange(batch_size, device=device) + offset
        loss = self.cross_entropy(logits, targets.repeat(2))
        return loss
