"""One status line on a terminal for systems and sweeps (click's progress bar): simulations run
of those the cache could not answer, how many the cache answered, sweep points done, an ETA.
Nothing at all when disabled (--quiet) or when the stream is not a terminal."""
from __future__ import annotations

import sys
import threading
from typing import TextIO

import click


class Progress:
    """Counts work listed and done; redraws its bar on every change when enabled."""

    def __init__(self, enabled: bool, stream: TextIO | None = None):
        self.enabled = enabled
        self.listed = self.cached = self.simulated = 0
        self.points = self.points_done = 0
        self._lock = threading.Lock()
        self._bar = None
        stream = stream or sys.stderr
        if enabled and stream.isatty():  # (click would still print the label once into a pipe)
            self._bar = click.progressbar(length=1, label="  simulations", file=stream, width=20,
                                          show_eta=True, show_pos=True, show_percent=False,
                                          item_show_func=lambda _: self.detail())

    def add(self, n: int, cached: int = 0) -> None:
        """n more simulations listed, `cached` of them answered by the cache."""
        with self._lock:
            self.listed += n
            self.cached += cached
            if self._bar is not None:
                run = self.listed - self.cached
                self._bar.length = run or self.listed  # all from the cache: shown as all done
                if not run:
                    self._bar.pos = self.cached
        self.draw()

    def done(self, n: int = 1) -> None:
        with self._lock:
            self.simulated += n
            if self._bar is not None:
                self._bar.make_step(n)  # its ETA: wall time per simulation run so far
        self.draw()

    def point(self, total: int | None = None, done: int = 0) -> None:
        """Sweep points: set the total, or count `done` more."""
        with self._lock:
            if total is not None:
                self.points = total
            self.points_done += done
        self.draw()

    def detail(self) -> str:
        parts = []
        if self.cached:
            parts.append(f"{self.cached} from cache")
        if self.points:
            parts.append(f"points {self.points_done}/{self.points}")
        return " · ".join(parts)

    def line(self) -> str:
        """The counts as text (what the bar shows beside its bar and ETA)."""
        run = self.listed - self.cached
        return " · ".join([f"simulations {self.simulated}/{run}"] + ([self.detail()] if self.detail() else []))

    def draw(self) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.render_progress()

    def clear(self) -> None:
        """Erase the line (before other output); the next change draws it again."""
        if self._bar is not None:
            self._bar.file.write("\r" + " " * 110 + "\r\x1b[?25h")  # and the cursor the bar hid
            self._bar.file.flush()
