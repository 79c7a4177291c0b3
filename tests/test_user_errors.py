from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from lightly_cotap.user_errors import UsageError, first_lines, one_line, run_command


def test_message_names_argument_value_and_fix() -> None:
    error = UsageError("--batch-size", -3, "must be an integer >= 1")
    assert str(error) == "--batch-size: -3: must be an integer >= 1"
    assert (error.argument, error.value, error.fix) == (
        "--batch-size",
        -3,
        "must be an integer >= 1",
    )
    # Paths and strings are quoted (spaces stay visible).
    assert str(UsageError("--data", Path("my images"), "is not a folder")) == (
        "--data: 'my images': is not a folder"
    )
    # A message about several arguments stands alone.
    assert str(UsageError("pass both --a and --b")) == "pass both --a and --b"
    assert isinstance(error, ValueError)


def test_long_messages_become_one_line() -> None:
    assert one_line("a\n  b\n\nc") == "a; b; c"
    assert one_line("keys:\n  x\n  y") == "keys: x; y"
    assert first_lines("a\nb\nc\nd\ne", 2) == "a; b; ... (3 more lines)"


def _fails(args: argparse.Namespace) -> None:
    raise UsageError("--data", "x", "holds no images")


def test_run_command_prints_one_line_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        run_command(_fails, argparse.Namespace(debug=False), "lightly-cotap train")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "lightly-cotap train: error: --data: 'x': holds no images\n"
    # --debug: the exception itself (with its traceback).
    with pytest.raises(UsageError):
        run_command(_fails, argparse.Namespace(debug=True), "lightly-cotap train")
    # Other exceptions are bugs: they propagate.
    with pytest.raises(ZeroDivisionError):
        run_command(lambda a: 1 / 0, argparse.Namespace(debug=False), "x")
    assert run_command(lambda a: 5, argparse.Namespace(), "x") == 5
