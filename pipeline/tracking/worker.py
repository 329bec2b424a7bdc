"""What a Ray Train worker logs through (pipeline/cluster/train.py's
WorkerSession, rank 0): the stage's MLflow run, opened by id in the worker.

The store is MLFLOW_TRACKING_URI and the pending queue that of ION_WORKDIR,
which pipeline/cluster/tasks.py gives every Ray worker. Tracking never stops
training: from the first call the store does not answer (a server down, a
store locked or slow), the worker queues its points in the workdir's pending
queue (pipeline/tracking/pending.py), which the driver replays.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric

from pipeline.tracking.client import OFFLINE_PREFIX, STORE_ERRORS, TrackedRun, first_line, highest_step
from pipeline.tracking.pending import PendingRecords
from pipeline.tracking.uri import TRACKING_URI_ENV, WORKDIR_ENV


def run_by_id(run_id: str) -> TrackedRun:
    """An existing run, from another process (a Ray Train worker): the store is
    MLFLOW_TRACKING_URI and the pending queue that of ION_WORKDIR, which
    pipeline/cluster/tasks.py gives every Ray worker."""
    uri, workdir = os.environ.get(TRACKING_URI_ENV), os.environ.get(WORKDIR_ENV)
    if not uri or not workdir:
        raise RuntimeError(f"{TRACKING_URI_ENV} or {WORKDIR_ENV} is not set in this worker "
                           "(pipeline/cluster/tasks.py's runtime env sets them)")
    return TrackedRun(_WorkerStore(uri, PendingRecords(Path(workdir))), run_id)


class _WorkerStore:
    """What a run opened in a training worker sends its metrics through: straight
    to the store while it answers; from the first failure on (a server down, a
    store locked or slow), into the workdir's pending queue, which the driver
    replays, so training never waits on or stops for the store again. The
    driver says how many records wait (pipeline/execution/run_context.py)."""

    def __init__(self, uri: str, pending: PendingRecords) -> None:
        self._uri = uri
        self.pending = pending
        self.offline_error: str | None = None

    @functools.cached_property
    def _client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self._uri)

    def last_step(self, run_id: str, key: str) -> int | None:
        if self.offline_error is not None or run_id.startswith(OFFLINE_PREFIX):
            return None
        try:
            return highest_step(self._client, run_id, key)
        except STORE_ERRORS as err:
            self.offline_error = first_line(err)
            return None

    def send(self, record: dict[str, Any]) -> None:
        if record["op"] != "metrics":
            raise ValueError(f"a training worker logs metrics only, not {record['op']!r}")
        if self.offline_error is None and not record["run"].startswith(OFFLINE_PREFIX):
            try:
                self._client.log_batch(record["run"], metrics=[Metric(key=k, value=v, timestamp=t, step=s)
                                                               for k, v, t, s in record["metrics"]])
                return
            except STORE_ERRORS as err:
                self.offline_error = first_line(err)
        # A resumed worker logs its whole history again: the replay skips the steps the run holds.
        self.pending.append({**record, "dedupe": True})
