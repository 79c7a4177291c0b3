"""The copy-paste inputs of the scene benchmarks: cache folder and its arguments.

``prepare_copy_paste_scenes.py`` builds ``CACHE/objects`` (class folders of RGBA
cut-outs) and ``CACHE/backgrounds`` (photos); the scene benchmarks read them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

CACHE = Path.home() / ".cache/lightly_cotap/debian"


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--objects`` and ``--backgrounds`` (default: the cache folders)."""
    parser.add_argument("--objects", type=Path, default=CACHE / "objects")
    parser.add_argument("--backgrounds", type=Path, default=CACHE / "backgrounds")


def check_input_folders(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> None:
    """Exits with a one-line error if ``--objects`` or ``--backgrounds`` is missing."""
    for name in ("objects", "backgrounds"):
        if not getattr(args, name).is_dir():
            parser.error(
                f"--{name} {getattr(args, name)} is not a folder; run "
                "benchmarks/prepare_copy_paste_scenes.py first."
            )
