"""Detects operations that make the host wait for the device (host synchronisations)."""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten

#: Operators that need a value or an output size from the device before the host
#: can go on: tensor-to-Python conversions (``bool(t)``, ``t.item()``, ``float(t)``,
#: ``if t:``) and data-dependent output shapes.
SYNCING_OPS = frozenset(
    {
        _aten._local_scalar_dense.default,
        _aten.equal.default,
        _aten.allclose.default,
        _aten.is_nonzero.default,
        _aten.nonzero.default,
        _aten.argwhere.default,
        _aten.masked_select.default,
        _aten._unique.default,
        _aten._unique2.default,
        _aten.unique_dim.default,
        _aten.unique_consecutive.default,
        _aten.repeat_interleave.Tensor,
        _aten.bincount.default,
    }
)


class HostSyncError(RuntimeError):
    """Raised by :func:`forbid_host_sync` on an operation that synchronises."""


class _ForbidHostSync(TorchDispatchMode):
    """Raises :class:`HostSyncError` on :data:`SYNCING_OPS` and boolean masks."""

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func in SYNCING_OPS or (
            func
            in (
                _aten.index.Tensor,
                _aten.index_put.default,
                _aten.index_put_.default,
                _aten._index_put_impl_.default,
            )
            and _has_mask_index(args[1])
        ):
            raise HostSyncError(
                f"{func} synchronises the host with the device (a tensor converted "
                "to a Python value, or an output shape that depends on tensor "
                f"values), called at {_caller()}."
            )
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """The innermost frame of the stack outside torch and this module."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and not path.endswith("host_sync.py"):
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "an unknown place"


def _has_mask_index(indices: Any) -> bool:
    return any(
        isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)
        for index in indices
    )


def _forbidden_tolist(self: torch.Tensor) -> Any:
    raise HostSyncError(
        f"Tensor.tolist synchronises the host with the device, called at {_caller()}."
    )


@contextmanager
def forbid_host_sync() -> Iterator[None]:
    """Raises :class:`HostSyncError` on any host synchronisation inside the block.

    On every device (CPU included) a dispatch mode rejects the operators that need a
    tensor value on the host: ``.item()``, ``bool(t)``, ``float(t)``, ``if t``,
    ``.tolist()``, ``nonzero``, boolean-mask indexing, ``torch.unique``,
    ``masked_select``, ``repeat_interleave`` with tensor repeats, ``bincount``. On
    CUDA, ``torch.cuda.set_sync_debug_mode("error")`` additionally rejects every
    synchronising CUDA call (e.g. a device-to-host copy).

    Use it to check that a training step can run ahead of the device, e.g.
    ``with forbid_host_sync(): loss = module.training_step(batch, 0)``.

    Raises:
        HostSyncError: On a synchronising operator (the dispatch check).
        RuntimeError: From CUDA's sync debug mode on a synchronising CUDA call.
    """
    cuda = torch.cuda.is_available()
    previous_mode = torch.cuda.get_sync_debug_mode() if cuda else 0
    tolist = torch.Tensor.tolist
    torch.Tensor.tolist = _forbidden_tolist  # type: ignore[method-assign,assignment]
    try:
        if cuda:
            torch.cuda.set_sync_debug_mode("error")
        with _ForbidHostSync():
            yield
    finally:
        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        if cuda:
            torch.cuda.set_sync_debug_mode(previous_mode)
