"""A dependency-free progress line on stderr: documents, tokens and their rates.

On a terminal the line is redrawn in place a few times a second; when stderr is a file or a
pipe (batch logs) a full line is written every `log_interval` seconds instead.
"""

from __future__ import annotations

import sys
import time


def human(n: float) -> str:
    """12345678 -> '12.3M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


class Progress:
    def __init__(
        self,
        label: str,
        total_bytes: int | None = None,
        enabled: bool = True,
        stream=None,
        log_interval: float = 10.0,
    ) -> None:
        self.label = label
        self.total_bytes = total_bytes
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.tty else log_interval
        self.start = time.monotonic()
        self._last = self.start
        self.documents = self.tokens = self.bytes = 0

    def update(self, documents: int, tokens: int, num_bytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bytes += num_bytes
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        text = (
            f"{self.label}: {human(self.documents)} docs, {human(self.tokens)} tokens, "
            f"{human(self.documents / elapsed)} docs/s, {human(self.tokens / elapsed)} tokens/s"
        )
        if self.total_bytes:
            text += f", {100.0 * min(self.bytes / self.total_bytes, 1.0):.0f}% of input"
        return text

    def _draw(self, now: float) -> None:
        if self.tty:
            self.stream.write("\r" + self.line(now) + "\x1b[K")
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()
