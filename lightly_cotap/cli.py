"""The ``lightly-cotap`` command line.

Subcommands:

- ``lightly-cotap eval``: dense evaluation of a checkpoint on image + mask folders
  (see :mod:`lightly_cotap.eval.command`).

Each subcommand module provides ``add_<name>_arguments(parser)`` and
``run_<name>(args)``; this module only dispatches (imports are lazy so ``--help`` is
fast).
The ``lightly-cotap`` script of ``pyproject.toml`` calls :func:`main` (this module
has no ``__main__`` block: ``python -m`` would import it twice and
:class:`CommandError` would exist as two classes).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


class CommandError(ValueError):
    """A user error of a subcommand (bad file, folder or option).

    :func:`main` prints its message and exits with code 2 instead of a traceback;
    any other exception propagates unchanged.
    """


def _run_eval(args: argparse.Namespace) -> None:
    from lightly_cotap.eval.command import run_eval

    run_eval(args)


def build_parser() -> argparse.ArgumentParser:
    """Builds the parser of ``lightly-cotap`` with all subcommands.

    Returns:
        The parser; ``args.func(args)`` runs the chosen subcommand.
    """
    from lightly_cotap.eval.command import add_eval_arguments

    parser = argparse.ArgumentParser(
        prog="lightly-cotap", description="Dense self-supervised learning (CoTAP)."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    eval_parser = subparsers.add_parser(
        "eval",
        help="Dense evaluation (linear probe, k-means, retrieval) of a checkpoint.",
        description="Dense evaluation of a checkpoint on image + mask folders.",
    )
    add_eval_arguments(eval_parser)
    eval_parser.set_defaults(func=_run_eval, subparser=eval_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightly-cotap``.

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Exit code 0 on success. A :class:`CommandError` (bad input, checked before
        any work) exits with code 2 and its message on stderr, like argparse errors.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except CommandError as ex:
        args.subparser.exit(2, f"{args.subparser.prog}: error: {ex}\n")
    return 0
