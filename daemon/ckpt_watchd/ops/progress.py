"""A progress bar for long one-shot work, on stderr, only when stderr is a terminal.

JSON and piped output stay clean: on anything but a terminal it writes nothing at all. It owns
its line (carriage return, redrawn at most ten times a second) and clears it when done.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 30
_EVERY = 0.1  # seconds between redraws


class Progress:
    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None,
                 clock: object = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.on = self.stream.isatty() if enabled is None else enabled
        self._clock = clock
        self.total = 0
        self.count = 0
        self.what = ""
        self._drawn = float("-inf")
        self._started = 0.0

    def start(self, total: int, what: str) -> None:
        self.total, self.count, self.what = total, 0, what
        self._started = self._now()
        self._draw(force=True)

    def advance(self, n: int = 1) -> None:
        self.count += n
        self._draw(force=self.count >= self.total)

    def done(self) -> None:
        if self.on:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()

    def _now(self) -> float:
        clock = self._clock
        return float(clock())  # type: ignore[operator]

    def _draw(self, *, force: bool = False) -> None:
        if not self.on:
            return
        now = self._now()
        if not force and now - self._drawn < _EVERY:
            return
        self._drawn = now
        frac = self.count / self.total if self.total else 1.0
        bar = "#" * int(frac * _WIDTH)
        elapsed = now - self._started
        eta = f", {elapsed / frac - elapsed:.0f}s left" if 0 < frac < 1 else ""
        self.stream.write(f"\r\x1b[2K{self.what} [{bar:<{_WIDTH}}] {self.count}/{self.total}{eta}")
        self.stream.flush()
