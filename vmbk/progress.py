"""Progress on stderr for a person at a terminal; nothing otherwise.

Several disks copy at once (in threads), so per-disk ``\\r`` bars would
overwrite each other: one status line shows every active copy, redrawn at
most `INTERVAL` times a second, and a finished copy gets its own line.
"""

from __future__ import annotations

import threading
import time
from typing import IO, Any

INTERVAL = 0.1


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Board:
    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self._lock = threading.Lock()
        self._active: dict[str, tuple[int, int, float]] = {}
        self._last = 0.0
        self._width = 0

    def callback(self, label: str) -> "Progress":
        return Progress(self, label)

    def update(self, label: str, done: int, total: int, started: float) -> None:
        with self._lock:
            self._active[label] = (done, total, started)
            now = time.monotonic()
            if now - self._last >= INTERVAL:
                self._last = now
                self._draw()

    def finish(self, label: str) -> None:
        with self._lock:
            item = self._active.pop(label, None)
            if item is None:
                return
            done, _total, started = item
            secs = max(time.monotonic() - started, 1e-6)
            self._write(f"{label}: {_size(done)} in {secs:.1f} s ({_size(done / secs)}/s)\n")
            self._draw()

    def _draw(self) -> None:
        parts = []
        for label, (done, total, started) in self._active.items():
            pct = 100 * done / total if total else 100.0
            rate = done / max(time.monotonic() - started, 1e-6)
            parts.append(f"{label} {pct:3.0f}% {_size(rate)}/s")
        self._write("  ".join(parts))

    def _write(self, text: str) -> None:
        line = text.rstrip("\n")
        pad = " " * max(self._width - len(line), 0)
        self.out.write("\r" + line + pad + ("\n" if text.endswith("\n") else ""))
        self.out.flush()
        self._width = 0 if text.endswith("\n") else len(line)


class Progress:
    """The ``progress(done, total)`` callback of one copy."""

    def __init__(self, board: Board, label: str) -> None:
        self.board = board
        self.label = label
        self.started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        self.board.update(self.label, done, total, self.started)

    def finish(self) -> None:
        self.board.finish(self.label)


def board_for(stream: Any) -> Board | None:
    """A board when ``stream`` is a terminal, else None (no output at all)."""
    try:
        return Board(stream) if stream.isatty() else None
    except (AttributeError, ValueError):
        return None
