"""Reading checkpoint files safely, with one-line errors that say what is wrong."""

from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be loaded, with what is wrong with it.

    Attributes:
        path: The file.
        problem: What is wrong (empty, truncated, not a checkpoint, or pickled
            objects that safe loading refuses), without advice.
        needs_unsafe_load: True if the file is a checkpoint that only
            ``weights_only=False`` can load (it holds pickled Python objects).
    """

    def __init__(self, path: str, problem: str, needs_unsafe_load: bool = False):
        """Initializes the error.

        Args:
            path: The file.
            problem: What is wrong with it.
            needs_unsafe_load: Whether only ``weights_only=False`` loads it.
        """
        self.path = path
        self.problem = problem
        self.needs_unsafe_load = needs_unsafe_load
        advice = (
            "; load it with weights_only=False only if you trust its source"
            if needs_unsafe_load
            else ""
        )
        super().__init__(f"{path}: {problem}{advice}")


def _blocked_global(message: str) -> str:
    """The object named in torch's 'Weights only load failed' message."""
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    return match.group(1) if match else "unsupported object"


def load_checkpoint_file(
    path: str | os.PathLike[str], weights_only: bool = True
) -> dict[str, Any]:
    """Loads a checkpoint file on the CPU without network access.

    Uses ``torch.load(weights_only=True)`` by default (``argparse.Namespace`` is
    allowed, as in DINO/iBOT training checkpoints). Files that need arbitrary
    pickled objects (some Lightning ``.ckpt`` hyper-parameters) raise a
    :class:`CheckpointFileError` that names the blocked object; pass
    ``weights_only=False`` only for files you trust. Empty, truncated and non-torch
    files raise a :class:`CheckpointFileError` that says so (not torch's reader
    error).

    Args:
        path: Path to a ``.pth`` / ``.pt`` / ``.ckpt`` file.
        weights_only: Restrict unpickling to tensors and primitive types.

    Returns:
        The loaded checkpoint dict.

    Raises:
        FileNotFoundError: If the file does not exist.
        CheckpointFileError: If the file is empty, damaged, not a checkpoint, holds
            objects that safe loading refuses, or does not hold a dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointFileError(path, "empty file (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive ("PK"), or a pickle (protocol opcode 0x80).
    if head != b"PK" and head[:1] != b"\x80":
        raise CheckpointFileError(
            path, "not a PyTorch checkpoint (not written by torch.save)"
        )
    try:
        if weights_only:
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except pickle.UnpicklingError as ex:
        if "Unsupported global" in str(ex):
            raise CheckpointFileError(
                path,
                f"holds pickled Python objects ({_blocked_global(str(ex))}) that "
                "safe loading (weights_only=True) refuses",
                needs_unsafe_load=True,
            ) from ex
        raise CheckpointFileError(
            path, "not a PyTorch checkpoint (not written by torch.save)"
        ) from ex
    except (EOFError, RuntimeError) as ex:
        # torch's zip reader ("failed finding central directory") or the legacy
        # unpickler stopped before the end of the data: the file is cut short.
        raise CheckpointFileError(
            path,
            f"truncated or damaged ({size} bytes, the data ends early or is "
            "corrupt); copy, download or export it again",
        ) from ex
    except (KeyError, ValueError, AttributeError, ImportError) as ex:
        raise CheckpointFileError(
            path, "not a PyTorch checkpoint (not written by torch.save)"
        ) from ex
    if not isinstance(checkpoint, Mapping):
        raise CheckpointFileError(
            path, f"must contain a dict, got {type(checkpoint).__name__}"
        )
    return dict(checkpoint)
