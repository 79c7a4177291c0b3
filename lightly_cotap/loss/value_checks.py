"""One switch for the value checks (NaN / inf, negative weights) of the losses.

Shape checks are always on. Value checks read tensor values on the host, which on
an accelerator stalls the pipeline until the device has caught up (a host
synchronisation per check and step), so they are off by default; turn them on
while debugging a run that produces NaNs:

    >>> from lightly_cotap.loss import value_checks
    >>> with value_checks():
    ...     loss = loss_fn(scores=scores, targets=targets)  # raises on NaN / inf

or for the whole process with ``set_value_checks(True)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_enabled = False


def value_checks_enabled() -> bool:
    """Whether the losses check input values (off by default)."""
    return _enabled


def set_value_checks(enabled: bool) -> None:
    """Turns the value checks of all losses on or off for this process.

    Args:
        enabled: Check the input values (finite values, non-negative weights).
    """
    global _enabled
    _enabled = bool(enabled)


@contextmanager
def value_checks(enabled: bool = True) -> Iterator[None]:
    """Turns the value checks on (or off) inside the block, restoring them after.

    Args:
        enabled: The setting inside the block.
    """
    previous = _enabled
    set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)
