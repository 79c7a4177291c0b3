"""SwAV/DINO-style CLS self-distillation across the crops of an image (CoTAP)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CrossCropClsLoss(nn.Module):
    """Implementation of the cross-crop CLS distillation term of CoTAP [0].

    The teacher's Sinkhorn codes of each of the G global crops of an image are
    predicted by the student on every *other* crop (global or local) of the same
    image, SwAV/DINO style [1, 2]:

    ``L = 1/G sum_c 1/(V-1) sum_{v != c} mean_b [ -sum_k q[b, c, k] log
    softmax(s[b, v] / temperature)_k ]``

    with ``q`` the teacher codes (e.g. from
    :class:`~lightly_cotap.loss.SinkhornCodes` with ``epsilon=0.07`` and a CLS
    queue) and ``s`` the student prototype scores. This follows
    ``InnerSampleLoss.forward_cls`` of the authors' code [3]. It uses no other
    images of the batch except through the Sinkhorn codes, whose normalisation is
    made distributed by ``SinkhornCodes(gather_distributed=True)``.

    - [0]: Wen et al., Semantic Concentration for Self-Supervised Dense
      Representations Learning, 2025, https://arxiv.org/abs/2509.09429
    - [1]: SwAV, 2020, https://arxiv.org/abs/2006.09882
    - [2]: DINO, 2021, https://arxiv.org/abs/2104.14294
    - [3]: https://github.com/KID-7391/CoTAP (``losses/inner_sample.py``)

    Attributes:
        temperature: Student softmax temperature.

    Examples:
        >>> loss_fn = CrossCropClsLoss()
        >>> loss = loss_fn(teacher_codes=codes, student=student_scores)
        >>> # codes: (B, 2, 4096) of the 2 global crops; student: (B, 6, 4096)
    """

    def __init__(self, temperature: float = 0.1) -> None:
        """Initializes the CrossCropClsLoss with the specified parameters.

        Args:
            temperature: Student softmax temperature, > 0.

        Raises:
            ValueError: If the temperature is not positive.
        """
        super().__init__()
        if not temperature > 1e-8:
            raise ValueError(f"temperature must be > 0, got temperature={temperature}.")
        self.temperature = float(temperature)

    def forward(self, *, teacher_codes: Tensor, student: Tensor) -> Tensor:
        """Computes the loss.

        Args:
            teacher_codes: Teacher codes of the G global crops (rows sum to 1).
                Shape: (B, G, K).
            student: Student prototype scores of all V crops, the G global crops
                first (in the order of ``teacher_codes``). Shape: (B, V, K).

        Returns:
            Scalar loss.

        Raises:
            ValueError: If the shapes do not match or ``V < 2``.
        """
        if teacher_codes.dim() != 3 or student.dim() != 3:
            raise ValueError(
                "teacher_codes and student must have shapes (B, G, K) and (B, V, K), "
                f"got {tuple(teacher_codes.shape)} and {tuple(student.shape)}."
            )
        b, g, k = teacher_codes.shape
        if student.shape[0] != b or student.shape[2] != k or student.shape[1] < g:
            raise ValueError(
                f"student must have shape (B, V, K) = ({b}, V >= {g}, {k}) matching "
                f"teacher_codes {tuple(teacher_codes.shape)}, got "
                f"{tuple(student.shape)}."
            )
        v = student.shape[1]
        if v < 2:
            raise ValueError(f"At least 2 crops are needed, got V={v}.")
        dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=student.device.type, enabled=False):
            log_p = torch.log_softmax(student.to(dtype) / self.temperature, dim=-1)
            q = teacher_codes.detach().to(dtype)
            # cross_entropy[b, c, v] = -sum_k q[b, c, k] log_p[b, v, k]
            cross_entropy = -torch.einsum("bck,bvk->bcv", q, log_p)
            not_same = ~torch.eye(g, v, dtype=torch.bool, device=student.device)
            loss = (cross_entropy * not_same).sum(dim=(1, 2)) / (g * (v - 1))
            return loss.mean()
