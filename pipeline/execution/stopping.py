"""SIGTERM and SIGINT end a run at a safe point.

`StopSignals.install()` (pipeline/cli.py, for every command) replaces Python's handlers: the
first signal raises `ion.errors.Interrupted` in the main thread at once, so the
runner marks the MLflow runs KILLED, Ray is shut down and the CLI exits with
128 + the signal number. Inside `graceful()` (the train stage on one process)
the first signal only sets a flag that the training loop reads after each
update: it writes a checkpoint and raises Interrupted itself, so the rerun
resumes from that very iteration. A second signal always interrupts at once.
Signals that come while the run is already stopping are ignored: the clean-up
(KILLED runs, Ray shutdown) must not be cut short by an impatient second kill.
"""
from __future__ import annotations

import contextlib
import signal
import sys
from typing import Callable, Iterator

from ion.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """The process's stop request: which signal came, and whether it was acted on."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._deferring = False
        self._raised = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self._raised:
            print(f"{name}: already stopping (marking the runs KILLED, shutting Ray down)", file=sys.stderr,
                  flush=True)
            return
        first = self.signum is None
        self.signum = signum
        if first and self._deferring:
            print(f"{name}: stopping after the current training iteration (with a checkpoint); "
                  f"send it again to stop at once", file=sys.stderr, flush=True)
            return
        self._raised = True
        raise Interrupted(f"stopped by {name}", signum)

    @contextlib.contextmanager
    def graceful(self) -> Iterator[Callable[[], bool]]:
        """Within: the first signal only sets the flag the yielded callable returns."""
        if self.requested():
            self._raised = True
            raise Interrupted(f"stopped by {signal.Signals(self.signum).name}", self.signum)
        self._deferring = True
        try:
            yield self.requested
        finally:
            self._deferring = False
            if self.requested():  # the stage stopped at its safe point: now we are stopping
                self._raised = True


NO_SIGNALS = StopSignals()  # never installed: graceful() blocks then do not defer anything
