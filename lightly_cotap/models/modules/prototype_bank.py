"""FIFO memory bank of pooled block features for the CoTAP object prototypes."""

from __future__ import annotations

import torch
from lightly.models import utils as lightly_utils
from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.utils import dist
from torch import Tensor


class PrototypeBank(MemoryBankModule):
    """FIFO bank of pooled block features that the CoTAP prototypes are learned from.

    CoTAP [0] keeps a bank of 1024 samples; each sample is the output of the block
    before the last, adaptive-average-pooled to k x k and flattened
    (``CoTAPViTOutput.bank_features``, width D * k * k). Until the bank is full every
    sample of a batch is added; afterwards ``num_update_when_full`` random samples per
    call replace the oldest ones (32 in the official code). Once :attr:`is_full`, the
    prototypes are initialised by spherical k-means on :attr:`samples`
    (:meth:`~lightly_cotap.models.cotap_vit.CoTAPVisionTransformer.init_prototypes_from_bank`)
    and trained with :class:`~lightly_cotap.loss.PrototypeEntropyLoss` against
    :attr:`samples`.

    Built on Lightly's ``MemoryBankModule`` (its buffers are not saved in the
    ``state_dict``; after resuming, the bank refills).

    - [0]: Wen et al., Semantic Concentration for Self-Supervised Dense
      Representations Learning, 2025, https://arxiv.org/abs/2509.09429

    Attributes:
        num_samples: Capacity N of the bank (paper: 1024).
        dim: Width of a sample, D * k * k.
        num_update_when_full: Samples added per :meth:`update` once the bank is full;
            None adds all.
        gather_distributed: Gather the samples of all processes before adding them.

    Examples:
        >>> bank = PrototypeBank(num_samples=1024, dim=384 * 9)
        >>> out = model(images, return_bank_features=True)
        >>> bank.update(out.bank_features)
        >>> if bank.is_full and not model.prototypes_initialized:
        >>>     model.init_prototypes_from_bank(bank.samples)
    """

    num_seen: Tensor

    def __init__(
        self,
        num_samples: int = 1024,
        dim: int = 384 * 9,
        num_update_when_full: int | None = 32,
        gather_distributed: bool = False,
    ) -> None:
        """Initializes the PrototypeBank with the specified parameters.

        Args:
            num_samples: Capacity N of the bank (paper: 1024).
            dim: Width of a sample, D * k * k.
            num_update_when_full: Samples added per :meth:`update` once the bank is
                full; None adds all (official code: 32).
            gather_distributed: Gather the samples of all processes before adding
                them (``lightly.models.utils.concat_all_gather``).

        Raises:
            ValueError: If an argument is invalid.
        """
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}.")
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}.")
        if num_update_when_full is not None and num_update_when_full <= 0:
            raise ValueError(
                f"num_update_when_full must be positive or None, got "
                f"{num_update_when_full}."
            )
        # As Lightly's losses do: lightly.utils.dist has no availability check.
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError(
                "gather_distributed is True but torch.distributed is not available."
            )
        super().__init__(
            size=(num_samples, dim),
            gather_distributed=gather_distributed,
            feature_dim_first=False,
        )
        self.num_samples = num_samples
        self.dim = dim
        self.num_update_when_full = num_update_when_full
        self.register_buffer(
            "num_seen", torch.zeros((), dtype=torch.long), persistent=False
        )
        # Host copies of the pointer and of ``num_seen``: read every step, they
        # must not wait for the device.
        self._ptr = 0
        self._num_seen = 0

    @property
    def is_full(self) -> bool:
        """True once the bank holds ``num_samples`` real samples."""
        return self._num_seen >= self.num_samples

    @property
    def samples(self) -> Tensor:
        """The samples added so far (all N once full). Shape: (min(seen, N), dim)."""
        samples: Tensor = self.bank[: min(self._num_seen, self.num_samples)]
        return samples.detach()

    @torch.no_grad()
    def update(self, features: Tensor) -> None:
        """Adds features to the bank (FIFO).

        Args:
            features: Pooled block features. Shape: (B, dim).

        Raises:
            ValueError: If the shape is invalid.
        """
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"features must have shape (B, {self.dim}), got {tuple(features.shape)}."
            )
        features = features.detach()
        if features.shape[0] == 0:
            return
        if self.is_full and self.num_update_when_full is not None:
            keep = torch.randperm(features.shape[0], device=features.device)
            features = features[keep[: self.num_update_when_full]]
        self._dequeue_and_enqueue(features.to(self.bank.dtype))

    @torch.no_grad()
    def _dequeue_and_enqueue(self, batch: Tensor) -> None:
        """Lightly's FIFO update with the pointer and the count kept on the host.

        Every count depends only on batch sizes, so unlike Lightly's version (which
        reads its pointer from the device) nothing waits for the device.
        """
        if self.gather_distributed and dist.world_size() > 1:
            batch = lightly_utils.concat_all_gather(batch)
        ptr, size = self._ptr, self.num_samples
        written = min(batch.shape[0], size - ptr)
        self.bank[ptr : ptr + written] = batch[:written]
        self._ptr = 0 if ptr + batch.shape[0] >= size else ptr + batch.shape[0]
        self._num_seen += written
        self.bank_ptr.fill_(self._ptr)
        self.num_seen.fill_(self._num_seen)
