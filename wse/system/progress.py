"""One status line on a terminal for systems and sweeps (click's progress bar): simulations run
of those the cache could not answer, how many the cache answered, sweep points done, an ETA.
Nothing at all when disabled (--quiet) or when the stream is not a terminal, unless asked for
plain lines there (--log-progress: a log file of a long run), at most one per interval."""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

import click


class Progress:
    """Counts work listed and done; redraws its bar on every change when enabled."""

    def __init__(self, enabled: bool, stream: TextIO | None = None, log_every_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        """log_every_s: where the stream is not a terminal, a plain line (elapsed time and the
        counts) when something changes and log_every_s have passed since the last one, and
        whenever every simulation listed so far is done."""
        self.enabled = enabled
        self.listed = self.cached = self.simulated = 0
        self.points = self.points_done = 0
        self._lock = threading.Lock()
        self._bar = None
        self._clock, self._start = clock, clock()
        self._log_every, self._logged, self._last_text = None, None, ""
        stream = stream or sys.stderr
        self._stream = stream
        if enabled and not stream.isatty() and log_every_s is not None:
            self._log_every = log_every_s
        elif enabled and stream.isatty():  # (click would still print the label once into a pipe)
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
        elif self._log_every is not None:
            self._log()

    def _log(self) -> None:
        with self._lock:
            now = self._clock()
            finished = self.simulated >= self.listed - self.cached
            if self._logged is not None and now - self._logged < self._log_every and not finished:
                return
            text = self.line()
            if text == self._last_text:
                return
            self._logged, self._last_text = now, text
            s = int(now - self._start)
            self._stream.write(f"[{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}] {text}\n")
            self._stream.flush()

    def clear(self) -> None:
        """Erase the line (before other output); the next change draws it again."""
        if self._bar is not None:
            self._bar.file.write("\r" + " " * 110 + "\r\x1b[?25h")  # and the cursor the bar hid
            self._bar.file.flush()
