"""Sinkhorn-Knopp cluster codes of teacher scores, balanced over a FIFO queue."""

from __future__ import annotations

import torch
from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.utils import dist
from torch import Tensor

from lightly_cotap.loss.value_checks import value_checks_enabled


class SinkhornCodes(MemoryBankModule):
    """Computes SwAV-style Sinkhorn-Knopp codes [0] of teacher prototype scores.

    The teacher's prototype scores of the current batch are concatenated with a
    FIFO queue of teacher scores of earlier steps, the iterations of Lightly's
    distributed :func:`lightly.loss.swav_loss.sinkhorn` balance the assignment of
    all of them to the K prototypes (``exp(score / epsilon)``, ``iterations``
    row/column normalisations), and the codes of the current batch are returned
    (every row sums to 1). Afterwards, if ``update`` is True, up to
    ``queue_update_size`` randomly chosen rows of the batch (optionally only those
    flagged by ``enqueue_mask``, e.g. foreground patches) are pushed into the queue.

    This follows the code of CoTAP [1] (``LossWrapper.sinkhorn`` and its
    ``MemoryBankPatch`` / ``MemoryBankCls`` queues): patch codes use
    ``epsilon=0.05`` and a queue of 262,144 / world_size scores filled with up to
    2,048 random foreground teacher patch scores per step; CLS codes use
    ``epsilon=0.07`` and a queue of 32,768 / world_size filled with up to 100 CLS
    scores per step. Differences: the codes are also computed on the first step
    (on the batch alone, the queue being empty) instead of skipping the losses, and
    the scores are shifted by their (all-ranks) maximum before the exponential,
    which leaves the codes unchanged but avoids overflow for large scores.

    The queue is a ``MemoryBankModule`` (per process, not saved in the state dict;
    it refills after resuming). Its pointer and fill level stay on the device and
    the Sinkhorn iterations run over the whole queue with the rows not filled yet
    masked out, so a call never waits for the device (no host synchronisation).
    With ``gather_distributed=True`` the Sinkhorn normalisations sum over all
    processes (as Lightly's ``sinkhorn`` does), so the codes are balanced over the
    queues and batches of all ranks. Computed in float32 without gradient.

    - [0]: SwAV, 2020, https://arxiv.org/abs/2006.09882
    - [1]: https://github.com/KID-7391/CoTAP (``losses/loss_wrapper.py``)

    Attributes:
        num_prototypes: Number K of prototypes (width of the scores).
        queue_size: Number of past scores kept (0 disables the queue).
        queue_update_size: Maximum number of scores added to the queue per call.
        epsilon: Sinkhorn temperature.
        iterations: Number of Sinkhorn iterations.
        gather_distributed: Normalise over all processes.

    Examples:
        >>> codes_fn = SinkhornCodes(num_prototypes=512, queue_size=65536,
        ...                          queue_update_size=2048, epsilon=0.05)
        >>> scores = teacher_patch_scores.flatten(0, 2)  # (B, h, w, K) -> (N, K)
        >>> codes = codes_fn(scores, enqueue_mask=fg_mask.flatten())
    """

    num_filled: Tensor

    def __init__(
        self,
        num_prototypes: int,
        queue_size: int = 32768,
        queue_update_size: int = 100,
        epsilon: float = 0.05,
        iterations: int = 3,
        gather_distributed: bool = False,
    ) -> None:
        """Initializes the SinkhornCodes with the specified parameters.

        Args:
            num_prototypes: Number K of prototypes, > 0.
            queue_size: Queue length (per process), >= 0.
            queue_update_size: Scores added per call, >= 0.
            epsilon: Sinkhorn temperature, > 0.
            iterations: Sinkhorn iterations, >= 1.
            gather_distributed: All-reduce the Sinkhorn sums over processes.

        Raises:
            ValueError: If an argument is out of range, or ``gather_distributed`` is
                set and torch.distributed is not available.
        """
        if num_prototypes < 1:
            raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}.")
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got queue_size={queue_size}.")
        if queue_update_size < 0:
            raise ValueError(
                f"queue_update_size must be >= 0, got queue_update_size="
                f"{queue_update_size}."
            )
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got epsilon={epsilon}.")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got iterations={iterations}.")
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError(
                "gather_distributed is True but torch.distributed is not available. "
                "Please set gather_distributed=False or install a torch distribution "
                "with distributed support."
            )
        super().__init__(
            size=(queue_size, num_prototypes) if queue_size > 0 else 0,
            gather_distributed=False,
            feature_dim_first=False,
        )
        self.num_prototypes = num_prototypes
        self.queue_size = queue_size
        self.queue_update_size = queue_update_size
        self.epsilon = float(epsilon)
        self.iterations = iterations
        self.sinkhorn_gather_distributed = gather_distributed
        self.register_buffer(
            "num_filled", torch.zeros((), dtype=torch.long), persistent=False
        )

    @property
    def queue(self) -> Tensor:
        """The scores in the queue. Shape: (num_filled, num_prototypes).

        Reading it takes the fill level from the device (a host synchronisation);
        :meth:`forward` masks the queue instead.
        """
        bank: Tensor = self.bank
        if self.queue_size == 0:
            return bank.new_zeros(0, self.num_prototypes)
        return bank[: int(self.num_filled)].detach()

    @torch.no_grad()
    def forward(  # type: ignore[override]
        self,
        scores: Tensor,
        *,
        enqueue_mask: Tensor | None = None,
        update: bool = True,
    ) -> Tensor:
        """Computes the codes of ``scores`` and updates the queue.

        Args:
            scores: Teacher prototype scores of the batch. Shape: (N, K).
            enqueue_mask: Optional bool mask of the rows that may enter the queue
                (e.g. foreground patches). Shape: (N,).
            update: Whether to push rows of ``scores`` into the queue.

        Returns:
            Codes of the batch rows, float32, rows sum to 1. Shape: (N, K).

        Raises:
            ValueError: If the shapes are invalid; with
                :func:`~lightly_cotap.loss.value_checks` on, also if the scores are
                not finite.
        """
        if scores.dim() != 2 or scores.shape[1] != self.num_prototypes:
            raise ValueError(
                f"scores must have shape (N, {self.num_prototypes}), got "
                f"{tuple(scores.shape)}."
            )
        if enqueue_mask is not None and (
            enqueue_mask.dtype != torch.bool
            or tuple(enqueue_mask.shape) != (scores.shape[0],)
        ):
            raise ValueError(
                f"enqueue_mask must be a bool tensor of shape ({scores.shape[0]},), "
                f"got {enqueue_mask.dtype} {tuple(enqueue_mask.shape)}."
            )
        with torch.autocast(device_type=scores.device.type, enabled=False):
            batch = scores.detach().float()
            if value_checks_enabled() and not bool(torch.isfinite(batch).all()):
                raise ValueError(
                    f"scores of shape {tuple(scores.shape)} contain non-finite values."
                )
            # The whole queue takes part; the rows not filled yet are masked out,
            # so the fill level never has to be read on the host.
            queue = (
                self.bank.detach().to(device=batch.device)
                if self.queue_size > 0
                else batch.new_zeros(0, self.num_prototypes)
            )
            filled = torch.arange(queue.shape[0], device=batch.device) < (
                self.num_filled.to(batch.device)
            )
            out = torch.cat([queue, batch], dim=0)
            valid = torch.cat([filled, filled.new_ones(batch.shape[0])])
            codes = self._sinkhorn(out, valid)[queue.shape[0] :]
            if update:
                self._enqueue(batch, enqueue_mask)
        return codes

    def _sinkhorn(self, out: Tensor, valid: Tensor) -> Tensor:
        """Lightly's ``sinkhorn`` over the rows of ``out`` where ``valid`` is True.

        Same iterations and distributed sums as
        :func:`lightly.loss.swav_loss.sinkhorn`; masked rows get zero codes and
        take no part in the prototype marginals. The global scalings of that
        function cancel in the next normalisation and are left out.
        """
        if out.shape[0] == 0:
            return out.clone()
        distributed = self.sinkhorn_gather_distributed and dist.world_size() > 1
        neg_inf = out.new_full((), float("-inf"))
        shift = torch.where(valid[:, None], out, neg_inf).amax()
        if distributed:
            # lightly.utils.dist has no all_reduce.
            torch.distributed.all_reduce(shift, op=torch.distributed.ReduceOp.MAX)
        q = torch.where(valid[:, None], torch.exp((out - shift) / self.epsilon), 0.0)
        q = q.t()  # (K, N)
        for _ in range(self.iterations):
            sum_of_rows = q.sum(dim=1, keepdim=True)
            if distributed:
                torch.distributed.all_reduce(sum_of_rows)
            q = q / sum_of_rows
            sum_of_columns = q.sum(dim=0, keepdim=True)
            q = q / torch.where(valid[None], sum_of_columns, 1.0)
        codes: Tensor = q.t()
        return codes

    def _enqueue(self, batch: Tensor, enqueue_mask: Tensor | None) -> None:
        """Pushes up to ``queue_update_size`` random rows allowed by the mask.

        FIFO like Lightly's ``MemoryBankModule`` (a batch that reaches the end of
        the queue fills it up and the pointer restarts at 0), with the pointer and
        the fill level kept on the device: how many rows the mask allows is never
        read on the host.
        """
        size = self.queue_size
        num_rows = min(self.queue_update_size, batch.shape[0], size)
        if num_rows == 0:
            return
        # Random priorities, -1 for rows the mask excludes: the top ``num_rows``
        # are a uniform random subset of the allowed rows (all of them if fewer).
        priority = torch.rand(batch.shape[0], device=batch.device)
        if enqueue_mask is not None:
            priority = torch.where(enqueue_mask, priority, -1.0)
        chosen = priority.topk(num_rows).indices.sort().values  # batch order
        allowed = priority[chosen] >= 0
        count = allowed.sum()
        # Slot of every chosen row: allowed rows first, in batch order.
        slot = torch.where(
            allowed,
            allowed.cumsum(0) - 1,
            count + (~allowed).cumsum(0) - 1,
        )
        bank: Tensor = self.bank
        ptr = self.bank_ptr.to(bank.device)
        target = ptr + slot.to(bank.device)
        write = (slot < count) & (target < size)
        index = target % size  # distinct, since num_rows <= size
        rows = batch[chosen].to(device=bank.device, dtype=bank.dtype)
        bank[index] = torch.where(write[:, None], rows, bank[index])
        end = ptr + count
        self.bank_ptr.copy_(torch.where(end >= size, torch.zeros_like(end), end))
        self.num_filled.copy_((self.num_filled + write.sum()).clamp_max(size))
