"""Runs the device check's sections: a time budget; failures reported, not raised."""

from __future__ import annotations

import math
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch


class Budget:
    """Seconds left of the whole run."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class SectionTimeout(Exception):
    """Raised inside a section that runs past the time budget."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise SectionTimeout("ran past the time budget")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_section(
    name: str, fn: Callable[[], dict[str, Any]], budget: Budget, needs_s: float
) -> dict[str, Any]:
    """Runs one section; any exception becomes ``status: failed`` with its reason."""
    if budget.left() < needs_s:
        log(f"[{name}] skipped: {budget.left():.0f} s left, needs ~{needs_s:.0f} s")
        return {"status": f"skipped: time budget ({budget.left():.0f} s left)"}
    log(f"[{name}] ...")
    start = time.monotonic()
    # A section that runs past the budget is interrupted (between Python steps).
    previous_handler = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(max(1, math.ceil(budget.left())))
    try:
        result = fn()
        result["status"] = result.get("status", "ok")
    except Exception as error:  # noqa: BLE001 - reported, the next section runs
        message = str(error).splitlines()[0] if str(error) else ""
        reason = f"{type(error).__name__}: {message[:400]}"
        log(f"[{name}] FAILED: {reason}\n{traceback.format_exc()}")
        result = {"status": f"failed: {reason}"}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous_handler)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["seconds"] = round(time.monotonic() - start, 1)
    log(f"[{name}] {result['status']} ({result['seconds']} s)")
    return result
