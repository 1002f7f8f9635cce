"""A progress line on stderr for long operator commands (``submit``, ``redrive``).

One line, rewritten in place at most every half second, only when stderr is a terminal
(logs and pipes get nothing); the final count is printed once at the end.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

INTERVAL = 0.5
"""Seconds between two redraws at most."""


class Progress:
    """``with Progress(total) as bar: bar.update(n)``: messages done of ``total`` (or unknown)."""

    def __init__(
        self,
        total: int | None,
        *,
        unit: str = "msg",
        enabled: bool = True,
        out: TextIO | None = None,
    ) -> None:
        self.out = out or sys.stderr
        self.total = total
        self.unit = unit
        self.enabled = enabled and self.out.isatty()
        self.done = 0
        self._started = time.monotonic()
        self._drawn = 0.0

    def update(self, n: int = 1) -> None:
        """Count ``n`` more done; redraw when the last draw is old enough."""
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._drawn >= INTERVAL:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        self.out.write(f"\r{self.done}{of} {self.unit} ({self.done / elapsed:.1f}/s)")
        self.out.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.out.write("\n")
            self.out.flush()
