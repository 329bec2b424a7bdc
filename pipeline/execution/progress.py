"""Progress lines: the one reporter behind ctx.progress, ctx.map and training.

    with Progress("train", total=1000, unit="it") as bar:
        bar.update()          # or bar.set(done)
    # train: 120/1000 (12%) 3.4 it/s, ETA 4m18s

On a terminal the line is redrawn in place (at most 10 times a second). In a
pipe or a log file, where a redrawn bar shows nothing (tqdm with disable=None
prints nothing there), a full line is printed at the first update, then at
most every ION_PROGRESS_EVERY seconds (default 30; 0 prints every update),
and once more when the work ends. `heartbeat` prints a line when a stage has
printed nothing for that long, so a run is never silent for more than that.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, TextIO, TypeVar

from ion.errors import UserError

T = TypeVar("T")

EVERY_ENV = "ION_PROGRESS_EVERY"
DEFAULT_EVERY_S = 30.0
_REDRAW_S = 0.1  # terminal redraws at most this often

_last_line = time.monotonic()  # when any reporter last printed a full line (for heartbeat)
_lock = threading.Lock()


def print_every() -> float:
    """Seconds between progress lines in a pipe: ION_PROGRESS_EVERY, default 30."""
    text = os.environ.get(EVERY_ENV)
    if text is None or text == "":
        return DEFAULT_EVERY_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UserError(f"{EVERY_ENV}={text!r}: expected seconds >= 0 between progress lines (e.g. 30; "
                        "0 prints every update); fix or unset it")
    return value


def _stdout() -> TextIO:
    return sys.stdout


def _terminal() -> Optional[TextIO]:
    """The terminal stdout ends on, or None when it is a pipe or a file (a run
    log tees stdout: pipeline/execution/run_log.py; its `terminal` is the real stream)."""
    stream = getattr(sys.stdout, "terminal", sys.stdout)
    try:
        return stream if stream.isatty() else None
    except (AttributeError, ValueError):
        return None


def emit(line: str) -> None:
    """Print one full line (and note when, for heartbeat)."""
    global _last_line
    with _lock:
        terminal = _terminal()
        if terminal is not None:
            terminal.write("\r\x1b[K")  # clear a redrawn bar first
        out = _stdout()
        out.write(line + "\n")
        out.flush()
        _last_line = time.monotonic()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """done/total of one piece of work, reported as the module docstring says."""

    def __init__(self, desc: str, total: Optional[int], *, unit: str = "items", start: int = 0,
                 also: Optional[tuple[str, float]] = None) -> None:
        """also: (unit, per item), a second rate to show, e.g. ("images", 4) for iterations of 4 images."""
        self.also = also
        self.desc = desc
        self.total = total
        self.unit = unit
        self.done = start
        self._start_done = start
        self._started = time.monotonic()
        self._every = print_every()
        self._printed: Optional[float] = None  # when this reporter last printed a full line
        self._drawn = 0.0
        self._closed = False

    def line(self) -> str:
        """`desc: done/total (pct%) rate unit/s, ETA t` (no total: `desc: done unit, rate unit/s`)."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = (self.done - self._start_done) / elapsed
        if not self.total:
            return f"{self.desc}: {self.done} {self.unit}, {rate:.2f} {self.unit}/s, {_duration(elapsed)} elapsed"
        left = max(self.total - self.done, 0)
        eta = _duration(left / rate) if rate > 0 else "?"
        also = f" ({rate * self.also[1]:.2f} {self.also[0]}/s)" if self.also else ""
        return (f"{self.desc}: {self.done}/{self.total} ({100.0 * self.done / self.total:.0f}%) "
                f"{rate:.2f} {self.unit}/s{also}, ETA {eta}")

    def update(self, n: int = 1) -> None:
        self.set(self.done + n)

    def set(self, done: int) -> None:
        """Record that `done` items are finished (absolute count)."""
        self.done = done
        now = time.monotonic()
        if self._printed is None or now - self._printed >= self._every:
            self._printed = now
            emit(self.line())
            return
        terminal = _terminal()
        if terminal is not None and now - self._drawn >= _REDRAW_S:
            self._drawn = now
            with _lock:
                terminal.write("\r\x1b[K" + self.line())
                terminal.flush()

    def close(self) -> None:
        """The last line: where the work ended and how long it took."""
        if self._closed:
            return
        self._closed = True
        elapsed = time.monotonic() - self._started
        emit(f"{self.line()} | {self.done} {self.unit} in {_duration(elapsed)}")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iterate(iterable: Iterable[T], desc: str, total: Optional[int] = None, unit: str = "items") -> Iterator[T]:
    """`iterable` with a Progress line (ctx.progress)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(desc, total, unit=unit) as bar:
        for item in iterable:
            yield item
            bar.update()


@contextmanager
def heartbeat(desc: str) -> Iterator[None]:
    """While the block runs, print `desc: working, <t> elapsed` whenever no
    progress line was printed for ION_PROGRESS_EVERY seconds (at least 5 s)."""
    every = max(print_every(), 5.0)
    started = time.monotonic()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(min(every, 5.0)):
            if time.monotonic() - _last_line >= every:
                emit(f"{desc}: working, {_duration(time.monotonic() - started)} elapsed")

    thread = threading.Thread(target=beat, name="progress-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
