"""Co-occurrence SSL (CO-SSL) loss: local features predict the other view's global one.

Over 400 lines: one loss in three base-method modes (BYOL, DINO, MoCo v3) that share
the pairing of views and the validation of the inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss, NegativeCosineSimilarity
from lightly.utils import dist
from torch import Tensor, nn
from torch import distributed as torch_dist

_MODES = ("byol", "dino", "moco")
_WEIGHTINGS = ("convex", "additive")


class CoSSLLossComponents(NamedTuple):
    """The components of :class:`CoSSLLoss`; ``total`` is what ``forward`` returns.

    Attributes:
        total: The weighted sum of the global and local losses.
        global_loss: The global loss L_g of the base method.
        local_loss: The local loss L_l.
    """

    total: Tensor
    global_loss: Tensor
    local_loss: Tensor


class CoSSLLoss(nn.Module):
    """Implementation of the CO-SSL loss [0] for BYOL, DINO and MoCo v3.

    CO-SSL aligns every local representation (a position of the feature map
    before global pooling) of one view with the *global* representation of the
    other view, and vice versa, on top of the usual global loss of the base
    method [0]. With V views, online outputs ``o_v``, targets ``t_v`` and local
    online outputs ``l_v^i`` (i = 1..L positions), the loss averages over the
    ordered view pairs v != v':

        L_g = mean_(v, v') ell(o_v, t_v')
        L_l = mean_(v, v') mean_i ell(l_v^i, t_v')
        L   = (1 - w_s) L_g + w_s L_l       (weighting="convex", default)
        L   = L_g + w_s L_l                 (weighting="additive")

    with ``ell`` by ``mode``:

    - ``"byol"`` (CO-BYOL, the paper's main method): Lightly's
      :class:`~lightly.loss.NegativeCosineSimilarity`. o_v = q(g(y(v))) are the
      online predictions, t_v = g_xi(y_xi(v)) the target projections,
      l_v^i = q2(g2(h^i(v))) the local predictions of the position-wise heads
      (:class:`~lightly_cotap.models.modules.CoSSLLocalProjectionHead` and
      :class:`~lightly_cotap.models.modules.CoSSLLocalPredictionHead`).
    - ``"dino"`` (CO-DINO): cross-entropy between the centred, sharpened teacher
      softmax and the student log-softmax, Lightly's
      :class:`~lightly.loss.DINOLoss` for L_g (it also updates the centre); the
      local student logits are matched to the teacher's global outputs with the
      centre *before* this step's update. Teacher views may be fewer than
      student views (multi-crop); pairs with the same index are skipped as in
      DINOLoss.
    - ``"moco"`` (CO-MoCo v3): InfoNCE of queries against the keys of the other
      view, the other images' keys being the negatives, scaled by
      2 * temperature like MoCo v3 [2]. Local queries use the same keys. The
      two directions are averaged (MoCo v3 sums them).

    Design decisions, each kept configurable:

    - Target of the local loss (Eq. 2): by default the target network's global
      representation mapped by the target *local* projection head,
      t_v = g2_xi(y_xi(v)), passed as ``local_target``. Without ``local_target``
      the global targets are used (g_xi(y_xi(v)); required in DINO mode, where
      the teacher's global logits are the local targets). The target head keeps
      the local and global projections apart, as the online side does.
    - w_s: 0.3 by default, inside the 0.2 - 0.5 range reported as good in [0].
      w_s "balances" the global and local losses [0], so the convex combination
      is the default.
    - The L local positions: e.g. the feature map adaptively average-pooled to
      n x n (the number of local representations is ablated as n^2 in [0]); any
      (B, L, D) tensor or channel-last (B, H, W, D) map is accepted. The paper bounds
      the receptive field of the local units (RF-ResNets);
      :func:`~lightly_cotap.models.cap_receptive_field` builds such a ResNet
      BagNet-style, but CO-SSL also works on a standard ResNet.

    - [0]: Aubret et al., Seeing the Whole in the Parts in Self-Supervised
      Representation Learning, 2025, https://arxiv.org/abs/2501.02860
    - [1]: BYOL, 2020, https://arxiv.org/abs/2006.07733
    - [2]: MoCo v3, 2021, https://arxiv.org/abs/2104.02057

    Attributes:
        w_s:
            Weight of the local loss.
        weighting:
            ``"convex"`` or ``"additive"``, see above.
        mode:
            ``"byol"``, ``"dino"`` or ``"moco"``.
        temperature:
            Temperature of the InfoNCE loss (``"moco"`` only; 0.2 in MoCo v3).
        gather_distributed:
            If True, the keys of all processes are the negatives (``"moco"``
            only; the other modes use no other images).
        dino_loss:
            The wrapped :class:`~lightly.loss.DINOLoss` (``"dino"`` only).

    Examples:
        >>> criterion = CoSSLLoss(w_s=0.3)
        >>> # p0, p1: online global predictions (B, D); z0, z1: target projections
        >>> # lp0, lp1: online local predictions (B, n, n, D)
        >>> # lt0, lt1: target local head on the target global representation (B, D)
        >>> loss = criterion(
        ...     global_online=[p0, p1], global_target=[z0, z1],
        ...     local_online=[lp0, lp1], local_target=[lt0, lt1],
        ... )
    """

    def __init__(
        self,
        w_s: float = 0.3,
        weighting: str = "convex",
        mode: str = "byol",
        temperature: float = 0.2,
        gather_distributed: bool = False,
        dino_output_dim: int = 65536,
        teacher_temp: float = 0.04,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        """Initializes the CoSSLLoss with the specified parameters.

        Args:
            w_s:
                Weight of the local loss, in [0, 1] for the convex weighting.
            weighting:
                ``"convex"`` or ``"additive"``.
            mode:
                ``"byol"``, ``"dino"`` or ``"moco"``.
            temperature:
                InfoNCE temperature (``"moco"``).
            gather_distributed:
                Gather the keys of all processes (``"moco"``).
            dino_output_dim:
                Output dimension of the DINO heads (``"dino"``).
            teacher_temp:
                Default teacher temperature (``"dino"``).
            student_temp:
                Student temperature (``"dino"``).
            center_momentum:
                Momentum of the teacher centre (``"dino"``).

        Raises:
            ValueError: On an unknown mode or weighting, a negative ``w_s`` (or
                one above 1 with the convex weighting), a temperature too close
                to zero, or gather_distributed without torch.distributed.
        """
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
        if weighting not in _WEIGHTINGS:
            raise ValueError(
                f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}."
            )
        if w_s < 0 or (weighting == "convex" and w_s > 1):
            raise ValueError(
                f"w_s must be in [0, 1] for the convex weighting and >= 0 for the "
                f"additive one, got w_s={w_s} with weighting={weighting!r}."
            )
        for name, value in (
            ("temperature", temperature),
            ("teacher_temp", teacher_temp),
            ("student_temp", student_temp),
        ):
            if abs(value) < 1e-8:
                raise ValueError(f"Illegal {name}: abs({value}) < 1e-8")
        if gather_distributed and not torch_dist.is_available():
            raise ValueError(
                "gather_distributed is True but torch.distributed is not available. "
                "Please set gather_distributed=False or install a torch version with "
                "distributed support."
            )
        self.w_s = w_s
        self.weighting = weighting
        self.mode = mode
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.student_temp = student_temp
        self.negative_cosine_similarity = NegativeCosineSimilarity(dim=-1)
        self.dino_loss: DINOLoss | None = None
        if mode == "dino":
            self.dino_loss = DINOLoss(
                output_dim=dino_output_dim,
                warmup_teacher_temp=teacher_temp,
                teacher_temp=teacher_temp,
                student_temp=student_temp,
                center_momentum=center_momentum,
            )

    def forward(
        self,
        *,
        global_online: Sequence[Tensor],
        global_target: Sequence[Tensor],
        local_online: Sequence[Tensor],
        local_target: Sequence[Tensor] | None = None,
        teacher_temp: float | None = None,
    ) -> Tensor:
        """Computes the CO-SSL loss.

        Args:
            global_online:
                One tensor per (student) view: BYOL predictions, DINO student
                logits or MoCo queries. Shape: (B, D) each
            global_target:
                One tensor per target (teacher) view: BYOL target projections,
                DINO teacher logits or MoCo keys (detached here). Same number of
                views as ``global_online`` except in DINO mode, where it may have
                fewer. Shape: (B, D) each
            local_online:
                One tensor per (student) view with the local outputs, as a list
                of positions or as a channel-last map of a local head.
                Shape: (B, L, D) or (B, H, W, D) each
            local_target:
                Optional targets of the local outputs, one per target view (e.g.
                g2_xi(y_xi(v))); defaults to ``global_target``. Not allowed in
                DINO mode. Shape: (B, D) each
            teacher_temp:
                Teacher temperature for this step (DINO mode); defaults to the
                constructor's.

        Returns:
            The scalar loss.

        Raises:
            ValueError: On missing views or inconsistent shapes.
        """
        return self.forward_components(
            global_online=global_online,
            global_target=global_target,
            local_online=local_online,
            local_target=local_target,
            teacher_temp=teacher_temp,
        ).total

    def forward_components(
        self,
        *,
        global_online: Sequence[Tensor],
        global_target: Sequence[Tensor],
        local_online: Sequence[Tensor],
        local_target: Sequence[Tensor] | None = None,
        teacher_temp: float | None = None,
    ) -> CoSSLLossComponents:
        """Computes the CO-SSL loss and its global and local parts.

        Args:
            global_online: See :meth:`forward`.
            global_target: See :meth:`forward`.
            local_online: See :meth:`forward`.
            local_target: See :meth:`forward`.
            teacher_temp: See :meth:`forward`.

        Returns:
            ``CoSSLLossComponents(total, global_loss, local_loss)``; ``total`` is
            what :meth:`forward` returns.

        Raises:
            ValueError: On missing views or inconsistent shapes.
        """
        local = self._validate(
            global_online=global_online,
            global_target=global_target,
            local_online=local_online,
            local_target=local_target,
        )
        targets = [t.detach() for t in global_target]
        local_targets = (
            targets if local_target is None else [t.detach() for t in local_target]
        )
        pairs = [
            (s, t)
            for s in range(len(global_online))
            for t in range(len(targets))
            if s != t
        ]
        if self.mode == "byol":
            global_loss = _mean(
                [
                    self.negative_cosine_similarity(global_online[s], targets[t])
                    for s, t in pairs
                ]
            )
            local_loss = _mean(
                [
                    self.negative_cosine_similarity(local[s], local_targets[t][:, None])
                    for s, t in pairs
                ]
            )
        elif self.mode == "moco":
            global_loss = _mean(
                [self._infonce(global_online[s], targets[t]) for s, t in pairs]
            )
            local_loss = _mean(
                [
                    self._infonce(local[s].flatten(0, 1), local_targets[t], local[s])
                    for s, t in pairs
                ]
            )
        else:
            assert self.dino_loss is not None
            temp = self.dino_loss.teacher_temp if teacher_temp is None else teacher_temp
            center = self.dino_loss.center.reshape(1, -1)
            local_loss = _mean(
                [
                    _soft_cross_entropy(
                        teacher_probs=F.softmax((targets[t] - center) / temp, dim=-1),
                        student_logits=local[s] / self.student_temp,
                    )
                    for s, t in pairs
                ]
            )
            global_loss = self.dino_loss(
                teacher_out=list(targets),
                student_out=list(global_online),
                teacher_temp=temp,
            )
        if self.weighting == "convex":
            total = (1 - self.w_s) * global_loss + self.w_s * local_loss
        else:
            total = global_loss + self.w_s * local_loss
        return CoSSLLossComponents(
            total=total, global_loss=global_loss, local_loss=local_loss
        )

    def _infonce(
        self, queries: Tensor, keys: Tensor, local_queries: Tensor | None = None
    ) -> Tensor:
        """MoCo v3 contrastive loss; ``local_queries`` (B, L, D) sets the labels."""
        batch_size = keys.shape[0]
        queries = F.normalize(queries, dim=-1)
        keys = F.normalize(keys, dim=-1)
        labels = torch.arange(batch_size, device=keys.device)
        if self.gather_distributed and dist.world_size() > 1:
            keys = torch.cat(dist.gather(keys), dim=0)
            labels = labels + dist.rank() * batch_size
        if local_queries is not None:
            labels = labels.repeat_interleave(local_queries.shape[1])
        logits = queries @ keys.T / self.temperature
        loss: Tensor = F.cross_entropy(logits, labels) * 2 * self.temperature
        return loss

    def _validate(
        self,
        *,
        global_online: Sequence[Tensor],
        global_target: Sequence[Tensor],
        local_online: Sequence[Tensor],
        local_target: Sequence[Tensor] | None,
    ) -> list[Tensor]:
        """Checks the inputs and returns the local outputs as (B, L, D) tensors."""
        n_online, n_target = len(global_online), len(global_target)
        if n_online < 1 or n_target < 1 or max(n_online, n_target) < 2:
            raise ValueError(
                "CoSSLLoss needs at least two views, got "
                f"{n_online} online and {n_target} target view(s)."
            )
        if self.mode != "dino" and n_online != n_target:
            raise ValueError(
                f"global_online and global_target must have the same number of "
                f"views in mode {self.mode!r}, got {n_online} and {n_target}."
            )
        if self.mode == "dino" and n_target > n_online:
            raise ValueError(
                f"DINO mode needs at most as many teacher views ({n_target}) as "
                f"student views ({n_online})."
            )
        if len(local_online) != n_online:
            raise ValueError(
                f"local_online must have one tensor per online view ({n_online}), "
                f"got {len(local_online)}."
            )
        if local_target is not None:
            if self.mode == "dino":
                raise ValueError(
                    "local_target is not supported in DINO mode: the local "
                    "student outputs are matched to the teacher's global outputs."
                )
            if len(local_target) != n_target:
                raise ValueError(
                    f"local_target must have one tensor per target view "
                    f"({n_target}), got {len(local_target)}."
                )
        reference = global_online[0]
        if reference.ndim != 2:
            raise ValueError(
                f"global_online tensors must have shape (B, D), got "
                f"{tuple(reference.shape)}."
            )
        batch_size, dim = reference.shape
        for name, tensors in (
            ("global_online", global_online),
            ("global_target", global_target),
            ("local_target", local_target or []),
        ):
            for t in tensors:
                if t.shape != (batch_size, dim):
                    raise ValueError(
                        f"{name} tensors must have shape (B, D) = ({batch_size}, "
                        f"{dim}), got {tuple(t.shape)}."
                    )
        local = []
        for t in local_online:
            if t.ndim == 4:
                t = t.flatten(1, 2)  # (B, H, W, D) -> (B, H*W, D)
            if t.ndim != 3 or t.shape[0] != batch_size or t.shape[2] != dim:
                raise ValueError(
                    f"local_online tensors must have shape (B, L, D) or (B, H, W, D) "
                    f"with B={batch_size}, D={dim}, got {tuple(t.shape)}."
                )
            if t.shape[1] == 0:
                raise ValueError("local_online tensors must have at least 1 position.")
            local.append(t)
        return local


def _mean(values: list[Tensor]) -> Tensor:
    return torch.stack(values).mean()


def _soft_cross_entropy(teacher_probs: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over batch and positions of -sum_k p_k log softmax(s)_k.

    Args:
        teacher_probs: Shape: (B, K)
        student_logits: Shape: (B, L, K)
    """
    log_probs = F.log_softmax(student_logits, dim=-1)
    return -(teacher_probs[:, None, :] * log_probs).sum(dim=-1).mean()
