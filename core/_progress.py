"""A one-line transfer progress bar on stderr, shown only on a terminal and for large transfers."""

from __future__ import annotations

import sys
import time
from typing import TextIO

THRESHOLD = 16 << 20  # below 16 MiB a transfer is over before a bar is worth reading


class Progress:
    """Counts bytes of one transfer and redraws `label  12.5/80.0 MB  15%` at most ten times a second.

    `enabled=None` means: draw when stderr is a terminal and the transfer reaches THRESHOLD bytes.
    """

    def __init__(self, label: str, total: int, enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = total >= THRESHOLD and _isatty(self.stream)
        self.label, self.total, self.enabled, self.done = label, total, enabled, 0
        self._drawn = 0.0

    def update(self, n: int) -> None:
        """Add `n` transferred bytes."""
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._drawn >= 0.1 or self.done >= self.total):
            self._drawn = now
            pct = 100 * self.done // self.total if self.total else 100
            self.stream.write(f"\r{self.label}  {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB  {pct:3d}%")
            self.stream.flush()

    def close(self) -> None:
        """End the line (if anything was drawn)."""
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
