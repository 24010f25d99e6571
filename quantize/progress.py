"""A progress bar for long conversions: one redrawn line on a terminal, a plain line every
few seconds otherwise (logs stay readable)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return ""


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, total_tensors: int, total_bytes: int, enabled: bool = True,
                 stream: TextIO | None = None, interval: float = 5.0):
        self.total_tensors, self.total_bytes = total_tensors, max(total_bytes, 1)
        self.tensors = self.bytes = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.interval = interval if not self.tty else 0.2
        self.start = time.monotonic()
        self.session_bytes = 0  # bytes done by this run (a resumed run starts part-way)
        self.last = float("-inf")  # draw on the first step

    def skip(self, tensors: int, nbytes: int) -> None:
        """Work finished by an earlier run."""
        self.tensors += tensors
        self.bytes += nbytes

    def advance(self, tensors: int, nbytes: int) -> None:
        self.tensors += tensors
        self.bytes += nbytes
        self.session_bytes += nbytes
        now = time.monotonic()
        if now - self.last >= self.interval or self.tensors == self.total_tensors:
            self.last = now
            self.draw(now)

    def line(self, now: float) -> tuple[str, float]:
        elapsed = max(now - self.start, 1e-6)
        rate = self.session_bytes / elapsed
        left = (self.total_bytes - self.bytes) / rate if rate > 0 else 0
        frac = self.bytes / self.total_bytes
        return (f"{self.tensors}/{self.total_tensors} tensors  {_size(self.bytes)}/{_size(self.total_bytes)}"
                f"  {_size(rate)}/s  ETA {_duration(left)}", frac)

    def draw(self, now: float) -> None:
        if not self.enabled:
            return
        text, frac = self.line(now)
        if self.tty:
            width = 24
            filled = int(frac * width)
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r[{bar}] {frac:4.0%} {text}\x1b[K")
        else:
            self.stream.write(f"quantize: {frac:4.0%} {text}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            if self.tty:
                self.stream.write("\r\x1b[K")
            self.stream.write(f"quantize: {text}\n")
            self.stream.flush()
