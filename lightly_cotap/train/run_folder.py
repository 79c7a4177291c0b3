"""The output folder of a training run: whether it holds a run, resuming it,
replacing it, and writing its checkpoints atomically.

In a distributed run only the first process checks and changes the folder (the
others are started after it wrote the run's settings, with their rank in the
environment).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from lightly_cotap.atomic_write import atomic_path
from lightly_cotap.models.checkpoint_files import load_checkpoint_file
from lightly_cotap.user_errors import UsageError, checkpoint_error

#: ``--resume`` without a path: the output folder's own checkpoint.
RESUME_OWN_RUN = ""

#: Files a run writes into its output folder (``--overwrite`` removes them).
RUN_FILES = ("settings.json", "backbone.pth", "dense_features.png")


def say(message: str) -> None:
    """Prints a message of the run to stderr (once, in the first process).

    Args:
        message: The message.
    """
    if is_first_process():
        print(message, file=sys.stderr)


#: Environment variables of a process's rank (torchrun, Lightning, SLURM, LSF).
_RANK_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "SLURM_PROCID",
    "JSM_NAMESPACE_RANK",
)


def is_first_process() -> bool:
    """Whether this is the first process of the run (the one that owns the folder).

    Decided from the environment, as the other processes of a distributed run are
    started with their rank set (by Lightning's launcher, torchrun or SLURM) while
    the first process checks the folder and writes its settings.

    Returns:
        True unless a rank variable of the environment is set and not 0.
    """
    return all(os.environ.get(name, "0") == "0" for name in _RANK_VARIABLES)


def read_settings(path: Path, option: str) -> dict[str, Any] | None:
    """Reads a run's ``settings.json``.

    Args:
        path: The file.
        option: The argument that led to it (for messages).

    Returns:
        The settings, or None without a file.

    Raises:
        UsageError: If the file is no JSON dict.
    """
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as ex:
        raise UsageError(
            option, path, f"cannot be read as the run's settings ({ex})"
        ) from ex
    if not isinstance(saved, dict):
        raise UsageError(option, path, "is not a settings dict of a run")
    return saved


def holds_run(folder: Path) -> bool:
    """Whether a folder holds a run (its settings, export or checkpoints).

    Args:
        folder: The output folder.

    Returns:
        True if a file of a run is there.
    """
    return any((folder / name).exists() for name in RUN_FILES) or any(
        (folder / "checkpoints").glob("*.ckpt")
    )


def resume_point(
    args: argparse.Namespace, output_dir: Path
) -> tuple[Path | None, int, dict[str, Any] | None]:
    """The checkpoint to resume, its step and its run's settings (None: new run).

    Args:
        args: ``--resume`` (None, :data:`RESUME_OWN_RUN` or a path) and
            ``--overwrite``.
        output_dir: The output folder.

    Returns:
        ``(checkpoint, global step, settings)``; ``(None, 0, None)`` for a new run,
        settings None when the resumed run has no ``settings.json``.

    Raises:
        UsageError: If the folder holds a run that is neither resumed nor
            overwritten, or the checkpoint is not a training checkpoint.
    """
    if args.resume is None:
        if holds_run(output_dir) and not args.overwrite and is_first_process():
            raise UsageError(
                "--output-dir",
                output_dir,
                "holds a run (settings.json / checkpoints); continue it with "
                "--resume, replace it with --overwrite, or choose another folder",
            )
        return None, 0, None
    if args.overwrite:
        raise UsageError(
            "--overwrite",
            True,
            "cannot be combined with --resume (continue the run, or replace it)",
        )
    if args.resume == RESUME_OWN_RUN:
        checkpoint = output_dir / "checkpoints" / "last.ckpt"
        if not checkpoint.is_file():
            raise UsageError(
                "--resume",
                output_dir,
                "--output-dir holds no checkpoints/last.ckpt to resume; start the "
                "run without --resume, or pass the checkpoint's path",
            )
    else:
        checkpoint = Path(args.resume)
    try:
        loaded = load_checkpoint_file(checkpoint)
    except (FileNotFoundError, ValueError) as ex:
        raise checkpoint_error(
            "--resume",
            checkpoint,
            ex,
            unsafe_fix="resume from a checkpoint of lightly-cotap train",
            mismatch_fix="resume from a checkpoint of lightly-cotap train",
        ) from ex
    hparams = loaded.get("hyper_parameters")
    if (
        "global_step" not in loaded
        or not isinstance(hparams, Mapping)
        or "backbone" not in hparams
    ):
        raise UsageError(
            "--resume",
            checkpoint,
            "is not a lightly-cotap training checkpoint (a backbone export?); "
            "resume from OUTPUT/checkpoints/last.ckpt, or start a new run from its "
            "weights with --init",
        )
    run_dir = checkpoint.resolve().parent.parent
    if checkpoint.resolve().parent.name != "checkpoints":
        run_dir = output_dir
    elif run_dir != output_dir.resolve() and holds_run(output_dir):
        raise UsageError(
            "--output-dir",
            output_dir,
            f"holds another run than the one of --resume ({run_dir}); resume into "
            "that run's folder or into an empty --output-dir",
        )
    saved = read_settings(run_dir / "settings.json", "--resume")
    if saved is None:
        say(
            f"--resume: no settings.json in {run_dir}: the run continues with the "
            "flags given now (repeat the flags it was started with)"
        )
    return checkpoint, int(loaded["global_step"]), saved


def clear_run(output_dir: Path) -> None:
    """Removes the files of the run in ``output_dir`` (``--overwrite``).

    Only the files a run writes (:data:`RUN_FILES`, ``checkpoints/*.ckpt``); the logs
    get a new version folder and the neighbour cache checks its key.

    Args:
        output_dir: The output folder.
    """
    for name in RUN_FILES:
        (output_dir / name).unlink(missing_ok=True)
    for checkpoint in (output_dir / "checkpoints").glob("*.ckpt"):
        checkpoint.unlink()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` writing every checkpoint atomically.

    A run killed while saving leaves the previous ``last.ckpt`` intact
    (:func:`~lightly_cotap.atomic_write.atomic_path`).
    """

    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        path: Any,
        storage_options: Any | None = None,
    ) -> None:
        """Saves a checkpoint through a temporary file renamed into place.

        Args:
            checkpoint: The checkpoint dict.
            path: The target file.
            storage_options: Passed to ``TorchCheckpointIO.save_checkpoint``.
        """
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def atomic_checkpoint_io() -> AtomicCheckpointIO:
    """Lightning checkpoint I/O that writes every checkpoint atomically.

    Returns:
        An :class:`AtomicCheckpointIO` (for ``Trainer(plugins=...)``).
    """
    return AtomicCheckpointIO()
