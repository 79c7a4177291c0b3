"""User errors of the command lines (``train``, ``export``, ``eval``).

A :class:`UsageError` names the argument, the value given and the fix. The command
lines run through :func:`run_command`, which prints it as one line
``<prog>: error: <argument>: <value>: <fix>`` and exits with code 2 (as argparse does
for a malformed command line); ``--debug`` shows the traceback instead. Every other
exception is a bug and propagates with its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from lightly_cotap.models.checkpoint_files import CheckpointFileError
from lightly_cotap.models.checkpoints import CheckpointMismatchError

_NO_VALUE = object()


class UsageError(ValueError):
    """A bad argument value, input file or folder, reported without a traceback.

    Attributes:
        argument: The command-line argument at fault (e.g. ``"--batch-size"``).
        value: The value given (``None`` if the error concerns no single value).
        fix: What to do about it.

    Examples:
        >>> raise UsageError("--batch-size", -3, "must be a positive number of pairs")
        UsageError: --batch-size: -3: must be a positive number of pairs
    """

    def __init__(self, argument: str, value: Any = _NO_VALUE, fix: str = "") -> None:
        """Initializes the error.

        Args:
            argument: The argument at fault, or (alone) a message about several
                arguments, e.g. ``"pass both --val-images and --val-masks"``.
            value: The value given; strings and paths are quoted.
            fix: What is wrong and how to fix it.
        """
        self.argument = argument
        self.value = None if value is _NO_VALUE else value
        self.fix = fix
        if value is _NO_VALUE:
            message = argument
        else:
            shown = (
                repr(os.fspath(value))
                if isinstance(value, (str, os.PathLike))
                else str(value)
            )
            message = f"{argument}: {shown}: {fix}"
        super().__init__(message)


def one_line(text: str) -> str:
    """Joins the lines of a message with ``"; "`` (a user error is one line).

    A line that ends with a colon introduces the next one and is joined with a space.

    Args:
        text: A message, possibly with line breaks (e.g. a list of keys).

    Returns:
        The message on one line.
    """
    joined = ""
    for line in (line.strip() for line in text.splitlines()):
        if line:
            separator = "" if not joined else " " if joined.endswith(":") else "; "
            joined += separator + line
    return joined


def first_lines(text: str, max_lines: int = 3) -> str:
    """The first lines of a long message (e.g. a list of mismatched keys), one line.

    Args:
        text: The message.
        max_lines: Lines to keep; the rest is counted.

    Returns:
        The shortened message on one line.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    more = len(lines) - max_lines
    return one_line("\n".join(lines[:max_lines])) + (
        f"; ... ({more} more lines)" if more > 0 else ""
    )


def checkpoint_error(
    option: str,
    path: str | os.PathLike[str],
    error: Exception,
    unsafe_fix: str,
    mismatch_fix: str,
) -> UsageError:
    """The user error for a checkpoint argument that cannot be loaded or used.

    Args:
        option: The argument that named the file (e.g. ``"--init"``).
        path: The file.
        error: What loading raised: ``FileNotFoundError``,
            :class:`~lightly_cotap.models.checkpoint_files.CheckpointFileError`,
            :class:`~lightly_cotap.models.checkpoints.CheckpointMismatchError` (weights of
            another architecture) or another ``ValueError`` of the key mapping.
        unsafe_fix: How this command loads a trusted file that holds pickled objects
            (e.g. ``"pass --unsafe-load"``).
        mismatch_fix: What to do when the weights do not fit the model (e.g.
            ``"pass the --arch it was trained with"``).

    Returns:
        The error to raise.
    """
    if isinstance(error, FileNotFoundError):
        return UsageError(option, path, "no such file")
    if isinstance(error, CheckpointFileError):
        fix = error.problem
        if error.needs_unsafe_load:
            fix += f"; if you trust its source, {unsafe_fix}"
        return UsageError(option, path, fix)
    text = str(error)
    for shown in (f"'{os.fspath(path)}' is ", f"{os.fspath(path)}: "):
        if text.startswith(shown):  # the path is already part of the message
            text = text[len(shown) :]
    if isinstance(error, CheckpointMismatchError):
        return UsageError(option, path, f"{first_lines(text)}; {mismatch_fix}")
    return UsageError(option, path, first_lines(text).rstrip("."))


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    """Adds ``--debug`` (show tracebacks of user errors) to a parser.

    Args:
        parser: The (sub)parser of a command.
    """
    parser.add_argument(
        "--debug",
        action="store_true",
        help="Show the full traceback of an error instead of a one-line message.",
    )


def run_command(
    run: Callable[[argparse.Namespace], Any], args: argparse.Namespace, prog: str
) -> Any:
    """Runs a command, reporting a :class:`UsageError` as one line and exit code 2.

    Args:
        run: The command (e.g. :func:`lightly_cotap.train.run.run_train`).
        args: Its parsed arguments; ``args.debug`` re-raises user errors.
        prog: Name printed in front of the message (e.g. ``"lightly-cotap train"``).

    Returns:
        What ``run`` returns.

    Raises:
        SystemExit: With code 2 after printing ``<prog>: error: ...`` to stderr.
    """
    try:
        return run(args)
    except UsageError as ex:
        if getattr(args, "debug", False):
            raise
        sys.stderr.flush()
        print(f"{prog}: error: {one_line(str(ex))}", file=sys.stderr)
        raise SystemExit(2) from ex
