"""One status line on a terminal for systems and sweeps: simulations done (and how many came from
the stage cache), sweep points done, elapsed time and an ETA. Silent when disabled (pipes,
--quiet); the caller decides."""
from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    """Counts work listed and done; redraws its line on every change when enabled."""

    def __init__(self, enabled: bool, stream: TextIO | None = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.listed = self.cached = self.simulated = 0
        self.points = self.points_done = 0
        self._sim_wall = 0.0
        self._lock = threading.Lock()
        self._shown = False

    def add(self, n: int, cached: int = 0) -> None:
        """n more simulations listed, `cached` of them answered by the cache."""
        with self._lock:
            self.listed += n
            self.cached += cached
        self.draw()

    def done(self, n: int = 1) -> None:
        with self._lock:
            self.simulated += n
            self._sim_wall = time.perf_counter() - self.t0
        self.draw()

    def point(self, total: int | None = None, done: int = 0) -> None:
        """Sweep points: set the total, or count `done` more."""
        with self._lock:
            if total is not None:
                self.points = total
            self.points_done += done
        self.draw()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        parts = [f"simulations {self.simulated + self.cached}/{self.listed}"
                 + (f" ({self.cached} from cache)" if self.cached else "")]
        if self.points:
            parts.append(f"points {self.points_done}/{self.points}")
        parts.append(f"{_clock(elapsed)} elapsed")
        left = self.listed - self.cached - self.simulated
        if self.points and self.points_done:
            eta = elapsed / self.points_done * (self.points - self.points_done)
        elif self.simulated and left > 0:
            eta = self._sim_wall / self.simulated * left
        else:
            eta = None
        if eta is not None:
            parts.append(f"ETA {_clock(eta)}")
        return " · ".join(parts)

    def draw(self) -> None:
        if not self.enabled:
            return
        self.stream.write("\r  " + self.line() + "   ")
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self.enabled and self._shown:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()
            self._shown = False


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
