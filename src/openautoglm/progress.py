"""A small progress reporter for long work (loading, calibration, eval, bench).

It writes to stderr: a self-updating line on a terminal, a few plain lines otherwise (logs, CI), and nothing
when disabled. It follows tqdm's contract loosely (``update``, context manager) without the dependency.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, desc: str, total: int | None = None, unit: str = "", enabled: bool = True, stream=None):
        self.desc, self.total, self.unit = desc, total, unit
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.n = 0
        self.t0 = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0.0
        self._next_pct = 25

    def update(self, k: int = 1, info: str = "") -> None:
        self.n += k
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._tty:
            if now - self._last > 0.1 or (self.total and self.n >= self.total):
                self._last = now
                self.stream.write("\r" + self._line(info) + "\x1b[K")
                self.stream.flush()
        elif self.total:
            pct = 100 * self.n // self.total
            if pct >= self._next_pct and self.n < self.total:
                self._next_pct = (pct // 25 + 1) * 25
                self.stream.write(self._line(info) + "\n")

    def _line(self, info: str = "") -> str:
        el = time.perf_counter() - self.t0
        tot = f"/{self.total}" if self.total else ""
        pct = f" {100 * self.n / self.total:3.0f}%" if self.total else ""
        extra = f" {info}" if info else ""
        return f"{self.desc}:{pct} {self.n}{tot}{self.unit} [{el:.1f}s]{extra}"

    def close(self, info: str = "") -> None:
        if not self.enabled:
            return
        if self._tty:
            self.stream.write("\r" + self._line(info) + "\x1b[K\n")
        else:
            self.stream.write(self._line(info) + "\n")
        self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
