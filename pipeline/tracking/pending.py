"""Tracking records that could not be sent: `<workdir>/mlflow_pending.jsonl`.

When the MLflow store stops answering mid-run (a tracking server that went
down, a store that stays locked), the stage goes on and what it would have
logged is appended here, one JSON record a line, in the order it happened, by
the driver and by the training workers alike:

    {"op": "create_run", "run": "offline-<hex>", "experiment": ..., "name": ..., "tags": {...}, "start": ms}
    {"op": "metrics", "run": <run id>, "metrics": [[key, value, timestamp_ms, step], ...], "dedupe": bool}
    {"op": "params" | "tags", "run": <run id>, "items": [[key, value], ...]}
    {"op": "artifact", "run": <run id>, "path": <file or folder>, "dir": <artifact dir or null>}
    {"op": "register" | "version_tags", "run": <run id>, "name": <registered model>, "tags": {...}}
    {"op": "terminate", "run": <run id>, "status": "FINISHED" | "FAILED" | "KILLED", "end": ms}

Every record also gets an "id" when it is appended. pipeline/tracking/client.py
replays them at the end of the run and at the start of the next one; a run
created while offline gets its real id then. What must survive a replay that
is cut short (a kill, a server that goes down again) is kept beside the queue
in `mlflow_pending.state.json`: the map from offline to real run ids and the
ids of the records already sent, so a rerun neither loses a run's later
records nor sends one twice. A record the store refuses for good (its run was
deleted, the store was moved aside) is set aside in `mlflow_rejected.jsonl`
and the rest is replayed. A torn line (a writer killed mid-line, a full disk)
is dropped; the next append starts on a line of its own.

The file lives in the workdir, not in a stage output, so its comings and goings
never touch a stage's manifest checksums. Several processes share it (commands,
training workers): every change holds its file lock, but not a replay's sends
to the store (a slow server would hold up every writer); one replay runs at a
time (a second lock).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock, Timeout

from ion.atomic import write_json_atomic, write_text_atomic

PENDING_FILE = "mlflow_pending.jsonl"
STATE_FILE = "mlflow_pending.state.json"
REJECTED_FILE = "mlflow_rejected.jsonl"


class Rejected(Exception):
    """The store refuses this record for good: sending it again cannot help."""


@dataclass(frozen=True)
class Replayed:
    """What one replay did: records still waiting, set aside for good, torn lines dropped."""

    left: int
    rejected: int = 0
    torn: int = 0
    first_rejection: str = ""


def _record_id(record: dict[str, Any], line: str) -> str:
    return str(record.get("id") or hashlib.sha1(line.encode("utf-8")).hexdigest())


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "op" in record and "run" in record else None


class PendingRecords:
    """The append-only queue of unsent tracking records of one workdir."""

    def __init__(self, workdir: Path) -> None:
        self.path = Path(workdir) / PENDING_FILE
        self.state_path = Path(workdir) / STATE_FILE
        self.rejected_path = Path(workdir) / REJECTED_FILE
        self._lock = FileLock(str(self.path) + ".lock")
        self._replay_lock = FileLock(str(self.path) + ".replay.lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            yield

    def append(self, record: dict[str, Any]) -> None:
        record = {**record, "id": record.get("id") or uuid.uuid4().hex}
        with self._locked(), open(self.path, "a+b") as f:
            f.seek(0, 2)
            start = b""
            if f.tell():  # a torn last line: this record starts on a line of its own
                f.seek(-1, 2)
                start = b"" if f.read(1) == b"\n" else b"\n"
            f.write(start + (json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))

    def _lines(self) -> list[str]:
        try:
            return [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def _state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
            return {"ids": dict(state["ids"]), "sent": list(state["sent"])}
        except (OSError, ValueError, KeyError, TypeError):
            return {"ids": {}, "sent": []}

    def count(self) -> int:
        """Records waiting to be sent."""
        sent = set(self._state()["sent"])
        return sum(1 for line in self._lines() if (r := _parse(line)) is not None and _record_id(r, line) not in sent)

    def real_ids(self) -> dict[str, str]:
        """Offline run id -> the id MLflow gave it, for the runs replayed so far."""
        return dict(self._state()["ids"])

    def replay(self, send: Callable[[dict[str, Any], dict[str, str]], None]) -> Replayed:
        """Send the records in order with `send(record, ids)` (`ids`: the offline
        -> real run id map, which send extends), until one fails for now; set aside
        the ones it raises Rejected for. Progress is saved after every record."""
        try:
            self._replay_lock.acquire(timeout=0)
        except Timeout:  # another process is replaying: it sends them
            return Replayed(left=self.count())
        try:
            return self._replay(send)
        finally:
            self._replay_lock.release()

    def _replay(self, send: Callable[[dict[str, Any], dict[str, str]], None]) -> Replayed:
        with self._locked():
            lines = self._lines()
        state = self._state()
        ids, sent = state["ids"], set(state["sent"])
        rejected, torn, first = 0, 0, ""
        try:
            for line in lines:
                record = _parse(line)
                if record is None:
                    torn += 1
                    continue
                rid = _record_id(record, line)
                if rid in sent:
                    continue
                try:
                    send(record, ids)
                except Rejected as err:
                    rejected += 1
                    first = first or f"{record['op']} of run {record['run']}: {err}"
                    with self._locked(), open(self.rejected_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps({**record, "rejected": str(err)}, sort_keys=True) + "\n")
                sent.add(rid)
                write_json_atomic(self.state_path, {"ids": ids, "sent": sorted(sent)})
        finally:
            with self._locked():
                left = []
                for line in self._lines():  # with what was appended meanwhile
                    record = _parse(line)
                    if record is not None and _record_id(record, line) not in sent:
                        left.append(line + "\n")
                if left:
                    write_text_atomic(self.path, "".join(left))
                else:
                    self.path.unlink(missing_ok=True)
                # The id map stays: a command still offline may yet queue records of a run replayed here.
                if ids:
                    write_json_atomic(self.state_path, {"ids": ids, "sent": []})
                else:
                    self.state_path.unlink(missing_ok=True)
        return Replayed(left=len(left), rejected=rejected, torn=torn, first_rejection=first)
