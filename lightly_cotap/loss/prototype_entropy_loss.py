"""Entropy loss that trains the object prototypes of the CoTAP object-aware filter."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class PrototypeEntropyLoss(nn.Module):
    """Implementation of the prototype entropy loss of CoTAP [0].

    Trains the object prototypes of the
    :class:`~lightly_cotap.models.modules.ObjectAwareFilter` against a bank of pooled
    block features (:class:`~lightly_cotap.models.modules.PrototypeBank`). For every
    prototype m, the cosine similarities to the N bank samples are turned into a
    distribution over the samples, ``p_m = softmax_n(cos(P_m, s_n) / temperature)``,
    and the loss is the mean entropy ``mean_m H(p_m) = -mean_m sum_n p_mn log p_mn``.

    The entropy is MINIMISED (the official class is called ``EntropyMaxLoss``, but the
    minimised quantity is the entropy): every prototype is pulled towards a few bank
    samples, i.e. it becomes sharper and more object-like. This follows the code
    published by the authors [1] (``losses/kernel_align.py``, weight 1, temperature
    0.1). The bank samples normally carry no gradient; the loss back-propagates into
    whatever requires grad (the prototypes, and the samples if they require grad).

    Non-finite inputs are not masked: NaN or infinite values give a NaN loss.
    No ``gather_distributed`` flag is needed: the samples come from the bank, which
    can gather across processes itself.

    - [0]: Wen et al., Semantic Concentration for Self-Supervised Dense
      Representations Learning, 2025, https://arxiv.org/abs/2509.09429
    - [1]: https://github.com/KID-7391/CoTAP

    Attributes:
        temperature: Softmax temperature of the cosine similarities (paper: 0.1).
        eps: Epsilon of the L2 normalisation (official code: 1e-5).

    Examples:
        >>> loss_fn = PrototypeEntropyLoss()
        >>> loss = loss_fn(prototypes=model.prototypes, samples=bank.samples)
        >>> loss.backward()
    """

    def __init__(self, temperature: float = 0.1, eps: float = 1e-5) -> None:
        """Initializes the PrototypeEntropyLoss with the specified parameters.

        Args:
            temperature: Softmax temperature of the cosine similarities, > 0.
            eps: Epsilon of the L2 normalisation, >= 0.

        Raises:
            ValueError: If the temperature is (close to) zero or negative, or eps is
                negative.
        """
        super().__init__()
        if abs(temperature) < 1e-8 or temperature < 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        if eps < 0:
            raise ValueError(f"eps must be non-negative, got {eps}.")
        self.temperature = temperature
        self.eps = eps

    def forward(self, *, prototypes: Tensor, samples: Tensor) -> Tensor:
        """Computes the mean entropy of the prototype-to-sample distributions.

        Args:
            prototypes: The prototypes. Shape: (M, D, k, k) or (M, D * k * k).
            samples: Bank samples. Shape: (N, D * k * k) with N >= 1.

        Returns:
            Scalar loss.

        Raises:
            ValueError: If the shapes are invalid or do not match.
        """
        if prototypes.ndim not in (2, 4) or prototypes.shape[0] == 0:
            raise ValueError(
                "prototypes must have shape (M, D, k, k) or (M, D * k * k) with M >= 1, "
                f"got {tuple(prototypes.shape)}."
            )
        flat = prototypes.flatten(1)
        if samples.ndim != 2 or samples.shape[0] == 0:
            raise ValueError(
                f"samples must have shape (N, {flat.shape[1]}) with N >= 1, got "
                f"{tuple(samples.shape)}."
            )
        if samples.shape[1] != flat.shape[1]:
            raise ValueError(
                f"samples width {samples.shape[1]} does not match the prototypes' "
                f"{flat.shape[1]} (prototypes shape {tuple(prototypes.shape)})."
            )
        p = F.normalize(flat, dim=1, eps=self.eps)
        s = F.normalize(samples.to(p.dtype), dim=1, eps=self.eps)
        logits = (p @ s.T) / self.temperature  # (M, N)
        log_prob = F.log_softmax(logits, dim=1)
        entropy = -(log_prob.exp() * log_prob).sum(dim=1)
        loss: Tensor = entropy.mean()
        return loss
