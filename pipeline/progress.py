"""Progress of a long command on stderr, readable both on a terminal and in a batch job's log.

On a terminal: one line rewritten in place a few times a second. Otherwise (stderr redirected
to a file, a SLURM log, ``kubectl logs``): a complete line every ``every`` seconds and one at
the end, so a log shows images, tiles, tiles/s and the ETA while the job runs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TextIO


class Progress:
    """Counts of done work against totals, printed as ``LABEL: i/I images, t/T tiles (p%),
    R tiles/s, ETA h:mm:ss``."""

    def __init__(
        self,
        images: int,
        tiles: int,
        *,
        label: str = "ingest",
        enabled: bool = True,
        every: float = 5.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total_images, self.total_tiles = images, tiles
        self.images = self.tiles = 0
        self.label, self.enabled = label, enabled and (images > 0 or tiles > 0)
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = 0.5 if self.tty else every
        self.clock = clock
        self.t0 = self.last = clock()

    def advance(self, tiles: int = 0, images: int = 0) -> None:
        self.tiles += tiles
        self.images += images
        if self.enabled and self.clock() - self.last >= self.every:
            self._print()

    def line(self) -> str:
        elapsed = max(self.clock() - self.t0, 1e-9)
        rate = self.tiles / elapsed
        pct = 100.0 * self.tiles / self.total_tiles if self.total_tiles else 100.0
        left = (self.total_tiles - self.tiles) / rate if rate > 0 else float("nan")
        eta = str(timedelta(seconds=round(left))) if left == left else "?"
        return (
            f"{self.label}: {self.images:,}/{self.total_images:,} images, {self.tiles:,}/{self.total_tiles:,} tiles "
            f"({pct:.1f}%), {rate:,.0f} tiles/s, ETA {eta}"
        )

    def _print(self) -> None:
        self.last = self.clock()
        if self.tty:
            print("\r" + self.line(), end="", file=self.stream, flush=True)
        else:
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._print()
            if self.tty:
                print(file=self.stream, flush=True)
            self.enabled = False
