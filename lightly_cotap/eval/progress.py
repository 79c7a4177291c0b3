"""Progress reporting of the dense evaluation: a bar, periodic lines, or nothing."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal, TextIO, TypeVar, Union

from tqdm import tqdm

T = TypeVar("T")

#: ``True``: a tqdm bar; ``"lines"``: one line every :data:`LINE_INTERVAL`
#: seconds (plus the first and the last), for logs and non-interactive runs;
#: ``False``: silent.
Progress = Union[bool, Literal["lines"]]

#: Seconds between two lines of ``progress="lines"``.
LINE_INTERVAL = 30.0


class LineProgress:
    """tqdm-like progress that prints a plain line now and then.

    Prints ``desc: n/total (p%), elapsed`` when it starts, at most every
    ``interval`` seconds while it runs, and when it ends; each on its own line,
    so that logs and ``tail -f`` show it (a tqdm bar rewrites one line with
    carriage returns).

    Attributes:
        n: Steps done.
        total: Number of steps, if known.
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        desc: str,
        total: int | None = None,
        interval: float | None = None,
        file: TextIO | None = None,
    ) -> None:
        """Initializes the progress and prints its first line.

        Args:
            iterable: What to iterate over, or None (then call :meth:`update`).
            desc: Label of the lines.
            total: Number of steps; default ``len(iterable)`` when it has one.
            interval: Seconds between lines; default :data:`LINE_INTERVAL`.
            file: Stream of the lines; default ``sys.stderr``.
        """
        self.iterable = iterable
        self.desc = desc
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.n = 0
        self.interval = LINE_INTERVAL if interval is None else interval
        self.file = file
        self._start = self._last = time.monotonic()
        self._printed = -1  # steps of the last line
        self._closed = False
        self._print()

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "LineProgress without an iterable"
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Counts ``n`` more steps; prints a line if ``interval`` has passed.

        Args:
            n: Steps done since the last call.
        """
        self.n += n
        if time.monotonic() - self._last >= self.interval:
            self._print()

    def close(self) -> None:
        """Prints the last line, unless it is printed already."""
        if not self._closed:
            self._closed = True
            if self._printed != self.n:
                self._print()

    def _print(self) -> None:
        self._last = time.monotonic()
        self._printed = self.n
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        if self.total:
            done += f" ({100 * self.n / self.total:.0f}%)"
        elapsed = tqdm.format_interval(self._last - self._start)
        print(f"{self.desc}: {done}, {elapsed}", file=self.file or sys.stderr)


def progress_bar(
    iterable: Iterable[T] | None = None,
    *,
    desc: str,
    progress: Progress,
    total: int | None = None,
) -> Any:
    """A tqdm bar, a :class:`LineProgress` or a silent tqdm, as ``progress`` says.

    Args:
        iterable: What to iterate over, or None (then use ``update``).
        desc: Label.
        progress: See :data:`Progress`.
        total: Number of steps (for ``iterable=None``).

    Returns:
        An iterable with ``update()`` and ``close()``, usable as a context manager.
    """
    if progress == "lines":
        return LineProgress(iterable, desc=desc, total=total)
    return tqdm(iterable, desc=desc, total=total, disable=not progress)
