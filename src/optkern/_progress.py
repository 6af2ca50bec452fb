"""A plain-text progress bar on stderr (no dependency)."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class ProgressBar:
    """``bar.update(done, text)`` redraws ``[#####.....]  50%  text  0:12`` in place when the
    stream is a terminal (at most every 0.1 s). On anything else (a log file, a pipe) it prints
    a line only for updates marked ``milestone=True``, so logs stay short."""

    def __init__(self, total: int, stream: Optional[TextIO] = None, width: int = 28) -> None:
        self.total = max(int(total), 1)
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._last_len = 0
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())

    def _line(self, done: int, text: str) -> str:
        frac = min(max(done / self.total, 0.0), 1.0)
        filled = int(round(frac * self.width))
        elapsed = int(time.perf_counter() - self.start)
        return (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {100 * frac:3.0f}%  {text}  "
            f"{elapsed // 60}:{elapsed % 60:02d}"
        )

    def update(self, done: int, text: str = "", milestone: bool = False) -> None:
        now = time.perf_counter()
        if self.tty:
            if milestone or done >= self.total or now - self._last_draw >= 0.1:
                line = self._line(done, text)
                pad = " " * max(self._last_len - len(line), 0)
                self.stream.write("\r" + line + pad)
                self.stream.flush()
                self._last_len = len(line)
                self._last_draw = now
        elif milestone:
            self.stream.write(self._line(done, text) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty and self._last_len:
            self.stream.write("\n")
            self.stream.flush()
