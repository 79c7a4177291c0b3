"""The ``lightly-cotap`` command line.

Subcommands register themselves in :data:`SUBCOMMANDS` as
``name -> (help, add_arguments(parser), run(args))``; ``train`` is the main job.
A user error (:class:`~lightly_cotap.user_errors.UsageError`) is printed as one line
and exits with code 2; ``--debug`` shows its traceback::

    lightly-cotap train                       # demo on the embedded photos (CPU)
    lightly-cotap train --data DIR --init dino_deitsmall16_pretrain.pth
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from lightly_cotap.user_errors import add_debug_argument, run_command


def _add_train(parser: argparse.ArgumentParser) -> None:
    from lightly_cotap.train.run import add_train_arguments

    add_train_arguments(parser)


def _run_train(args: argparse.Namespace) -> Any:
    from lightly_cotap.train.run import run_train

    return run_train(args)


def _add_eval(parser: argparse.ArgumentParser) -> None:
    from lightly_cotap.eval.command import add_eval_arguments

    add_eval_arguments(parser)


def _run_eval(args: argparse.Namespace) -> Any:
    from lightly_cotap.eval.command import run_eval_command

    return run_eval_command(args)


#: name -> (help text, function adding the arguments, function running it).
SUBCOMMANDS: dict[
    str,
    tuple[
        str,
        Callable[[argparse.ArgumentParser], None],
        Callable[[argparse.Namespace], Any],
    ],
] = {
    "train": (
        "CoTAP training (no arguments: a short demo on the embedded sample photos).",
        _add_train,
        _run_train,
    ),
    "eval": (
        "Dense evaluation (linear probe, k-means, retrieval) of a checkpoint on "
        "image + mask folders.",
        _add_eval,
        _run_eval,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """Builds the ``lightly-cotap`` argument parser with all subcommands.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="lightly-cotap",
        description="Dense self-supervised learning (CoTAP) for Lightly.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(subparser)
        add_debug_argument(subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightly-cotap`` console script.

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Exit code (0; a user error raises ``SystemExit(2)`` after its message).
    """
    args = build_parser().parse_args(argv)
    run_command(SUBCOMMANDS[args.command][2], args, f"lightly-cotap {args.command}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
