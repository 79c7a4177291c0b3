"""The ``lightly-cotap`` command line.

Subcommands register themselves in :data:`SUBCOMMANDS` as
``name -> (help, add_arguments(parser), run(args))``; ``train`` is the main job.
A user error (:class:`~lightly_cotap.user_errors.UsageError`) is printed as one line
and exits with code 2; ``--debug`` shows its traceback::

    lightly-cotap train                       # demo on the embedded photos (CPU)
    lightly-cotap train --data DIR --init dino_deitsmall16_pretrain.pth
    lightly-cotap mmseg-config --data SEG --checkpoint cotap_run/backbone.pth \\
        --output seg.py                       # then mmseg's tools/train.py seg.py
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from lightly_cotap.user_errors import add_debug_argument, run_command


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with ``(default: X)`` after every option that has a default.

    Left as written: options without a default (required, ``None``, an empty
    list, flags that are off) and help texts that already name their default.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if (
            action.required
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default == []
            or "default" in (action.help or "").lower()
        ):
            return action.help
        return super()._get_help_string(action)


# The subcommands are imported when the parser is built, not at module import: the
# eval command imports HelpFormatter from here.
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


def _add_mmseg_config(parser: argparse.ArgumentParser) -> None:
    from lightly_cotap.mmseg_config import add_mmseg_config_arguments

    add_mmseg_config_arguments(parser)


def _run_mmseg_config(args: argparse.Namespace) -> Any:
    from lightly_cotap.mmseg_config import run_mmseg_config_command

    return run_mmseg_config_command(args)


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
    "mmseg-config": (
        "Write an mmsegmentation config that fine-tunes or linearly probes an "
        "exported backbone on image + mask folders (then: mmseg's tools/train.py).",
        _add_mmseg_config,
        _run_mmseg_config,
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
        subparser = subparsers.add_parser(
            name, help=help_text, description=help_text, formatter_class=HelpFormatter
        )
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
