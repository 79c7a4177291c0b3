"""Random score / target lists and a value-and-gradient helper for the ranking tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def random_lists(
    shape: tuple[int, ...], ties: bool, seed: int
) -> tuple[Tensor, Tensor]:
    """float64 student scores and teacher targets in [-1, 1]; ``ties`` rounds both."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.6
    t = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
    if ties:
        s = (s * 4).round() / 4
        t = (t * 3).round() / 3
    return s, t


def value_and_grad(
    fn: Callable[..., Tensor],
    s: Tensor,
    allow_unused: bool = False,
    **kwargs: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Value of ``fn(scores=s, **kwargs)`` and its gradient with respect to ``s``.

    With ``allow_unused`` a loss that does not depend on ``s`` has a zero gradient;
    without it that is an error.
    """
    s = s.clone().requires_grad_(True)
    value = fn(scores=s, **kwargs)
    (grad,) = torch.autograd.grad(value, s, allow_unused=allow_unused)
    return value.detach(), torch.zeros_like(s) if grad is None else grad
