"""The learning-rate schedule the quality benchmarks share.

Linear warm-up over the first tenth of the steps times a half-cosine decay over all
steps. Written out rather than taken from ``lightly.utils.scheduler``: Lightly's
``cosine_warmup_schedule`` starts the cosine after the warm-up, and the recorded
benchmark numbers were measured with this product form.
"""

from __future__ import annotations

import math

import torch


def set_lr(opt: torch.optim.Optimizer, step: int, steps: int, lr: float) -> None:
    """Sets every group's learning rate for ``step`` of ``steps``.

    A group's optional ``lr_scale`` entry multiplies its rate.
    """
    warmup = max(1, steps // 10)
    value = (
        lr
        * min(1.0, (step + 1) / warmup)
        * (0.5 + 0.5 * math.cos(math.pi * step / steps))
    )
    for group in opt.param_groups:
        group["lr"] = value * group.get("lr_scale", 1.0)
