"""Tracking records that could not be sent: `<workdir>/mlflow_pending.jsonl`.

When the MLflow store stops answering mid-run (a tracking server that went
down, a store that stays locked), the stage goes on and what it would have
logged is appended here, one JSON record a line, in the order it happened:

    {"op": "create_run", "run": "offline-<hex>", "experiment": ..., "name": ..., "tags": {...}, "start": ms}
    {"op": "metrics", "run": <run id>, "metrics": [[key, value, timestamp_ms, step], ...]}
    {"op": "params" | "tags", "run": <run id>, "items": [[key, value], ...]}
    {"op": "artifact", "run": <run id>, "path": <file or folder>, "dir": <artifact dir or null>}
    {"op": "terminate", "run": <run id>, "status": "FINISHED" | "FAILED" | "KILLED", "end": ms}

pipeline/tracking/client.py replays them at the end of the run and at the start of the
next one; a run created while offline gets its real id then. The file lives in
the workdir, not in a stage output, so its comings and goings never touch a
stage's manifest checksums. Several commands may share it: every change holds
its file lock.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

from ion.atomic import write_text_atomic

PENDING_FILE = "mlflow_pending.jsonl"


class PendingRecords:
    """The append-only queue of unsent tracking records of one workdir."""

    def __init__(self, workdir: Path) -> None:
        self.path = Path(workdir) / PENDING_FILE
        self._lock = FileLock(str(self.path) + ".lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            yield

    def append(self, record: dict[str, Any]) -> None:
        with self._locked(), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def count(self) -> int:
        try:
            with open(self.path, encoding="utf-8") as f:
                return sum(1 for line in f if line.strip())
        except FileNotFoundError:
            return 0

    def replay(self, send: Callable[[dict[str, Any]], None]) -> int:
        """Send the records in order until one fails; keep that one and the rest.
        A torn last line (a process killed while appending) is dropped. Returns
        the number of records still pending."""
        with self._locked():
            try:
                lines = self.path.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                return 0
            records = []
            for line in lines:
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
            sent = 0
            try:
                for record in records:
                    send(record)
                    sent += 1
            finally:
                left = records[sent:]
                if left:
                    write_text_atomic(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in left))
                else:
                    self.path.unlink(missing_ok=True)
            return len(left)
