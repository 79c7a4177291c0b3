"""Cross-image CLS distillation between an image and its semantic neighbour (CoTAP)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CrossImageClsLoss(nn.Module):
    """Implementation of the cross-image CLS distillation term of CoTAP [0].

    Each image ``x`` comes with a semantic neighbour ``x+``. The student predicts
    the teacher's Sinkhorn codes of one image from the other, over all pairs of
    global crops:

    ``L = 1/2 [ mean_{b,i,j} H(q+[b, i], p[b, j]) + mean_{b,i,j} H(q[b, i],
    p+[b, j]) ]``

    with ``H(q, p) = -sum_k q_k log p_k``, ``q`` / ``q+`` the teacher codes of the
    global crops of ``x`` / ``x+`` and ``p`` / ``p+`` the student's
    ``softmax(scores / temperature)`` on the global crops of ``x`` / ``x+``. This
    follows ``IntraSampleLoss.ranking_ce_cls_loss`` of the authors' code [1]
    (temperature 0.2). Like there, the codes are those of the cross-crop CLS term
    (one Sinkhorn over the teacher CLS scores of x and x+ and the CLS queue).

    - [0]: Wen et al., Semantic Concentration for Self-Supervised Dense
      Representations Learning, 2025, https://arxiv.org/abs/2509.09429
    - [1]: https://github.com/KID-7391/CoTAP (``losses/intra_sample.py``)

    Attributes:
        temperature: Student softmax temperature.

    Examples:
        >>> loss_fn = CrossImageClsLoss()
        >>> loss = loss_fn(
        ...     teacher_codes_x=q_x, teacher_codes_pos=q_pos,  # (B, 2, 4096)
        ...     student_x=s_x, student_pos=s_pos,              # (B, 2, 4096)
        ... )
    """

    def __init__(self, temperature: float = 0.2) -> None:
        """Initializes the CrossImageClsLoss with the specified parameters.

        Args:
            temperature: Student softmax temperature, > 0.

        Raises:
            ValueError: If the temperature is not positive.
        """
        super().__init__()
        if not temperature > 1e-8:
            raise ValueError(f"temperature must be > 0, got temperature={temperature}.")
        self.temperature = float(temperature)

    def forward(
        self,
        *,
        teacher_codes_x: Tensor,
        teacher_codes_pos: Tensor,
        student_x: Tensor,
        student_pos: Tensor,
    ) -> Tensor:
        """Computes the loss.

        Args:
            teacher_codes_x: Teacher codes of the global crops of ``x``.
                Shape: (B, G, K).
            teacher_codes_pos: Teacher codes of the global crops of ``x+``.
                Shape: (B, G, K).
            student_x: Student prototype scores of the global crops of ``x``.
                Shape: (B, G', K).
            student_pos: Student prototype scores of the global crops of ``x+``.
                Shape: (B, G', K).

        Returns:
            Scalar loss.

        Raises:
            ValueError: If the shapes do not match.
        """
        if (
            teacher_codes_x.dim() != 3
            or teacher_codes_pos.shape != teacher_codes_x.shape
        ):
            raise ValueError(
                "teacher_codes_x and teacher_codes_pos must both have shape (B, G, K), "
                f"got {tuple(teacher_codes_x.shape)} and "
                f"{tuple(teacher_codes_pos.shape)}."
            )
        b, _, k = teacher_codes_x.shape
        if (
            student_x.dim() != 3
            or student_x.shape[0] != b
            or student_x.shape[2] != k
            or student_pos.shape != student_x.shape
        ):
            raise ValueError(
                f"student_x and student_pos must both have shape (B, G', K) = ({b}, "
                f"G', {k}), got {tuple(student_x.shape)} and "
                f"{tuple(student_pos.shape)}."
            )
        dtype = torch.float64 if student_x.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=student_x.device.type, enabled=False):
            q = torch.stack([teacher_codes_pos, teacher_codes_x]).detach().to(dtype)
            scores = torch.stack([student_x, student_pos]).to(dtype)
            log_p = torch.log_softmax(scores / self.temperature, dim=-1)
            # cross_entropy[d, b, i, j] = -sum_k q[d, b, i, k] log_p[d, b, j, k]
            cross_entropy = -torch.einsum("dbik,dbjk->dbij", q, log_p)
            return cross_entropy.mean()
