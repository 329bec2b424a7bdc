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


class _Tee:
    """A text stream that writes to the real stream and to the log file."""

    def __init__(self, terminal: TextIO, file: TextIO) -> None:
        self.terminal = terminal
        self._file = file

    def write(self, text: str) -> int:
        self.terminal.write(text)
        if not self._file.closed:
            self._file.write(text)
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()
        if not self._file.closed:
            self._file.flush()

    def isatty(self) -> bool:
        return self.terminal.isatty()

    def fileno(self) -> int:
        return self.terminal.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.terminal, "encoding", "utf-8")


class RunLog:
    """Tee stdout, stderr and logging (INFO and up) into a new file under <workdir>/logs/."""

    def __init__(self, workdir: Path) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self.path = Path(workdir).resolve() / LOGS_DIR / f"run-{stamp}-{os.getpid()}.log"

    def __enter__(self) -> "RunLog":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Appended line by line as the run goes: a log is not an artifact, and a
        # killed run's partial log is what one wants to read.
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout = _Tee(sys.stdout, self._file)
        sys.stderr = _Tee(sys.stderr, self._file)
        root = logging.getLogger()
        # With a handler on the root logger, logging's last-resort stderr
        # handler goes quiet: keep warnings on the real stderr as before (the
        # file gets them from its own handler).
        self._handlers = [logging.StreamHandler(self._saved[1]), logging.StreamHandler(self._file)]
        self._handlers[0].setLevel(logging.WARNING)
        self._handlers[1].setLevel(logging.INFO)
        self._handlers[1].setFormatter(logging.Formatter(_FORMAT))  # stderr keeps last-resort's bare message
        for handler in self._handlers:
            root.addHandler(handler)
        self._root_level = root.level
        root.setLevel(min(root.level or logging.INFO, logging.INFO))
        return self

    def __exit__(self, *exc) -> None:
        root = logging.getLogger()
        for handler in self._handlers:
            root.removeHandler(handler)
        root.setLevel(self._root_level)
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = self._saved
        self._file.close()
