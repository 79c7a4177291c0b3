"""Atomic file writes: every file the package writes goes through this module.

A file is first written to a temporary file in the same folder (same file system,
same suffix, so writers that pick the format from the suffix keep working), flushed
to disk and then renamed over the target with :func:`os.replace`. A process killed
while writing leaves the previous file (or no file) plus at most a hidden temporary
file, never a truncated target; readers never see a half-written file.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path to write to; on success it replaces ``path``.

    The parent folder is created. If the block raises, the temporary file is removed
    and ``path`` is left as it was.

    Args:
        path: The file to write.

    Yields:
        A path in the same folder with the same suffix (``.name.<pid>.<random>.tmp.ext``).

    Examples:
        >>> with atomic_path("out/weights.pth") as tmp:
        ...     torch.save(state_dict, tmp)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Unique per process and call: DDP ranks may write the same file at once.
    tmp = target.with_name(
        f".{target.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{target.suffix}"
    )
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def save_torch(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` written atomically.

    Args:
        obj: The object to save (e.g. a state dict).
        path: Output file.

    Returns:
        The written path.
    """
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Writes UTF-8 text atomically.

    Args:
        path: Output file.
        text: The content.

    Returns:
        The written path.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Writes JSON (indented, no NaN / inf) atomically.

    Args:
        path: Output file.
        data: JSON-serialisable data.

    Returns:
        The written path.

    Raises:
        ValueError: If ``data`` holds NaN or infinite floats.
    """
    return write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def save_image(image: Any, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """``PIL.Image.Image.save`` written atomically (format from the suffix).

    Args:
        image: A PIL image.
        path: Output file.
        **kwargs: Options of ``Image.save`` (e.g. ``quality=95``).

    Returns:
        The written path.
    """
    with atomic_path(path) as tmp:
        image.save(tmp, **kwargs)
    return Path(path)
