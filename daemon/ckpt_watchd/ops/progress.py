"""A progress bar for long one-shot work, on stderr, only when stderr is a terminal.

JSON and piped output stay clean: on anything but a terminal it writes nothing at all. It owns
its line (carriage return, redrawn at most ten times a second): whatever else is printed to the
terminal while it shows (`print`, or log lines through `log_stream`) first clears the bar, which
is drawn again after. `done` clears it for good.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO, cast

_WIDTH = 30
_EVERY = 0.1  # seconds between redraws


class Progress:
    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None,
                 clock: object = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.on = _is_terminal(self.stream) if enabled is None else enabled
        self._clock = clock
        self.total = 0
        self.count = 0
        self.what = ""
        self.detail = ""
        self._drawn = float("-inf")
        self._started = 0.0
        self._shown = False

    def start(self, total: int, what: str) -> None:
        self.total, self.count, self.what, self.detail = total, 0, what, ""
        self._started = self._now()
        self._draw(force=True)

    def grow(self, n: int = 1) -> None:
        """More work joined (a run found while --once works through the root)."""
        self.total += n
        self._draw()

    def advance(self, n: int = 1) -> None:
        self.count += n
        self.detail = ""
        self._draw(force=self.count >= self.total)

    def note(self, detail: str) -> None:
        """What the item in progress is doing (`last.pt: 1.2 GB written`); redrawn lazily."""
        self.detail = detail
        self._draw()

    def print(self, line: str, file: TextIO | None = None) -> None:
        """A line of output (stdout by default) that must not land inside the bar."""
        self._clear()
        out = file if file is not None else sys.stdout
        out.write(line + "\n")
        out.flush()
        self._draw(force=True)

    def done(self) -> None:
        self._clear()
        self.on = False

    def log_stream(self) -> TextIO:
        """A stream for the stderr log: each line clears the bar first and redraws it after."""
        return cast(TextIO, _AboveTheBar(self))

    def _now(self) -> float:
        clock = self._clock
        return float(clock())  # type: ignore[operator]

    def _clear(self) -> None:
        if self.on and self._shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._shown = False

    def _draw(self, *, force: bool = False) -> None:
        if not self.on or not self.total:  # nothing to show yet (--once before its first job)
            return
        now = self._now()
        if not force and now - self._drawn < _EVERY:
            return
        self._drawn = now
        frac = min(1.0, self.count / self.total)
        bar = "#" * int(frac * _WIDTH)
        elapsed = now - self._started
        eta = f", {elapsed / frac - elapsed:.0f}s left" if 0 < frac < 1 else ""
        detail = f"  {self.detail}" if self.detail else ""
        self.stream.write(f"\r\x1b[2K{self.what} [{bar:<{_WIDTH}}] {self.count}/{self.total}"
                          f"{eta}{detail}")
        self.stream.flush()
        self._shown = True


class _AboveTheBar:
    """What structlog's PrintLogger writes to: the bar's stream, with the bar moved out of the
    way of every line."""

    def __init__(self, progress: Progress) -> None:
        self._p = progress

    def write(self, text: str) -> int:
        self._p._clear()
        return self._p.stream.write(text)

    def flush(self) -> None:
        self._p.stream.flush()
        self._p._draw(force=True)

    def isatty(self) -> bool:
        return _is_terminal(self._p.stream)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
