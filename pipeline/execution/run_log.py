"""The run's log file: everything `pipeline run` prints (stdout and stderr) and
Python logging, in <workdir>/logs/run-<UTC time>-<pid>.log.

    with RunLog(workdir) as log:
        ...                     # print() and logging reach the terminal and log.path

Terminal redraws of progress bars go to the terminal only (pipeline/execution/progress.py
writes them to `sys.stdout.terminal`); full lines reach both.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TextIO

LOGS_DIR = "logs"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _LogFile:
    """The log file as a stream that never raises: on a full or read-only disk the
    first OSError is kept (the run ends on it, pipeline/execution/disk_errors.py) and the
    terminal alone gets the rest, instead of every print() failing in turn."""

    def __init__(self, file: TextIO, path: Path) -> None:
        self._file = file
        self.path = path
        self.failure: OSError | None = None

    def write(self, text: str) -> int:
        if self.failure is None and not self._file.closed:
            try:
                self._file.write(text)
            except OSError as err:
                self._fail(err)
        return len(text)

    def flush(self) -> None:
        if self.failure is None and not self._file.closed:
            try:
                self._file.flush()
            except OSError as err:
                self._fail(err)

    def _fail(self, err: OSError) -> None:
        self.failure = OSError(err.errno, err.strerror, str(self.path))

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as err:
            if self.failure is None:
                self._fail(err)


class _Tee:
    """A text stream that writes to the real stream and to the log file."""

    def __init__(self, terminal: TextIO, file: _LogFile) -> None:
        self.terminal = terminal
        self._file = file

    def write(self, text: str) -> int:
        self.terminal.write(text)
        self._file.write(text)
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()
        self._file.flush()

    def isatty(self) -> bool:
        return self.terminal.isatty()

    def fileno(self) -> int:
        return self.terminal.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.terminal, "encoding", "utf-8")


class _FirstLine(logging.Formatter):
    """The terminal's view of a library's log record: its first line, no traceback (a library
    that logs the exception it then raises, as MLflow's store does, would otherwise print it
    twice and bury the run's own one-line error). The log file keeps the whole record."""

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage().strip().split("\n", 1)[0]


def _one_line(record: logging.LogRecord) -> bool:
    """A filter for MLflow's own stderr handler (its logger does not propagate): the record's
    first line, its traceback dropped (the store error it logs is raised and reported anyway)."""
    record.msg, record.args = record.getMessage().strip().split("\n", 1)[0], None
    record.exc_info, record.exc_text = None, None
    return True


class RunLog:
    """Tee stdout, stderr and logging (INFO and up) into a new file under <workdir>/logs/."""

    def __init__(self, workdir: Path) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self.path = Path(workdir).resolve() / LOGS_DIR / f"run-{stamp}-{os.getpid()}.log"

    def __enter__(self) -> "RunLog":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Appended line by line as the run goes: a log is not an artifact, and a
        # killed run's partial log is what one wants to read.
        self._file = _LogFile(open(self.path, "a", encoding="utf-8", buffering=1), self.path)
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout = _Tee(sys.stdout, self._file)
        sys.stderr = _Tee(sys.stderr, self._file)
        root = logging.getLogger()
        # With a handler on the root logger, logging's last-resort stderr
        # handler goes quiet: keep warnings on the real stderr as before (the
        # file gets them from its own handler).
        self._handlers = [logging.StreamHandler(self._saved[1]), logging.StreamHandler(self._file)]
        self._handlers[0].setLevel(logging.WARNING)
        self._handlers[0].setFormatter(_FirstLine())
        self._handlers[1].setLevel(logging.INFO)
        self._handlers[1].setFormatter(logging.Formatter(_FORMAT))  # stderr keeps last-resort's bare message
        for handler in self._handlers:
            root.addHandler(handler)
        self._mlflow_handlers = list(logging.getLogger("mlflow").handlers)
        for handler in self._mlflow_handlers:
            handler.addFilter(_one_line)
        self._root_level = root.level
        root.setLevel(min(root.level or logging.INFO, logging.INFO))
        return self

    def __exit__(self, *exc) -> None:
        root = logging.getLogger()
        for handler in self._handlers:
            root.removeHandler(handler)
        for handler in self._mlflow_handlers:
            handler.removeFilter(_one_line)
        root.setLevel(self._root_level)
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = self._saved
        self._file.close()
        if self._file.failure is not None and exc[0] is None:
            raise self._file.failure  # the log could not be written: the run says so and exits 2
