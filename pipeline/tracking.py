"""MLflow adapter: the only module that imports mlflow.

One experiment per config name; one parent run per `pipeline run` invocation;
one nested child run per stage (tags stage, cache_key, cache_hit; a cached
stage's run points to the run that produced the output with `produced_by`).
Uses `MlflowClient` with explicit run ids, no global active-run state, so one
client (one import, one set of sqlite migrations) serves the whole invocation.
"""
from __future__ import annotations

import functools
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

# Before mlflow is imported (it reads them at import): no INFO lines about
# database migrations, no "View run at" banners for a tracking server.
# setdefault: a user who sets them keeps their choice.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID  # noqa: E402
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH  # noqa: E402

from pipeline.runtime import MLFLOW_DB, TRACKING_URI_ENV, tracking_uri_for  # noqa: E402
from ion.schema import flatten  # noqa: E402

__all__ = ["FAILED", "FINISHED", "KILLED", "TrackedRun", "Tracker", "run_by_id", "tracking_uri_for", "ui_hint"]

ARTIFACTS_DIR = "mlartifacts"
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"


def ui_hint(tracking_uri: str) -> str:
    """The line that shows the runs: an `mlflow ui` command, or the server's address."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


_MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
# MLflow accepts alphanumerics and _ - . space : / in metric and param names.
_BAD_KEY_CHARS = re.compile(r"[^0-9A-Za-z_\-. :/]")


def mlflow_key(name: str) -> str:
    """`name` as MLflow accepts it for a metric or param: "AR@100" -> "AR_at_100",
    "phases[0].lr" -> "phases.0.lr"; other characters become "_"."""
    name = name.replace("@", "_at_").replace("[", ".").replace("]", "")
    return _clip(_BAD_KEY_CHARS.sub("_", name), MAX_ENTITY_KEY_LENGTH)


def _now_ms() -> int:
    return int(time.time() * 1000)


class TrackedRun:
    """One MLflow run, addressed by id."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self._client = client
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        stamp = _now_ms()
        batch = [Metric(key=mlflow_key(k), value=float(v), timestamp=stamp, step=step or 0)
                 for k, v in metrics.items()]
        for start in range(0, len(batch), _MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=batch[start:start + _MAX_METRICS_PER_BATCH])

    def last_step(self, key: str) -> int | None:
        """The highest step logged for metric `key` in this run, None when none is."""
        history = self._client.get_metric_history(self.run_id, mlflow_key(key))
        return max((m.step for m in history), default=None)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested values are flattened to dotted keys; values are clipped to MLflow's length limit."""
        flat = flatten(dict(params))
        batch = [Param(mlflow_key(k), _clip(str(v), MAX_PARAM_VAL_LENGTH)) for k, v in flat.items()]
        if batch:
            self._client.log_batch(self.run_id, params=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        batch = [RunTag(k, _clip(str(v), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        if batch:
            self._client.log_batch(self.run_id, tags=batch)

    def log_file(self, path: Path, artifact_dir: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_dir)

    def log_text(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(text, encoding="utf-8")
            self._client.log_artifact(self.run_id, str(path))

    def log_dir(self, path: Path, artifact_dir: str) -> None:
        self._client.log_artifacts(self.run_id, str(path), artifact_path=artifact_dir)

    def finish(self, status: str, error: str | None = None) -> None:
        if error is not None:
            self.set_tags({"error": error})
        self._client.set_terminated(self.run_id, status=status)


def run_by_id(run_id: str) -> TrackedRun:
    """An existing run, from another process (a Ray Train worker): the store is
    MLFLOW_TRACKING_URI, which pipeline/cluster.py gives every Ray worker."""
    uri = os.environ.get(TRACKING_URI_ENV)
    if not uri:
        raise RuntimeError(f"{TRACKING_URI_ENV} is not set in this worker (pipeline/cluster.py's runtime env sets it)")
    return TrackedRun(MlflowClient(tracking_uri=uri), run_id)


class Tracker:
    """The MLflow side of one `pipeline run` invocation.

    Nothing touches the store before the first run starts, so a run that stops on
    a user error (a missing upstream output) creates no database and no experiment.
    """

    def __init__(self, *, tracking_uri: str, experiment: str, workdir: Path) -> None:
        self.tracking_uri = tracking_uri
        self._experiment_name = experiment
        self._workdir = Path(workdir).resolve()

    @functools.cached_property
    def _client(self) -> MlflowClient:
        if self._local:
            self._workdir.mkdir(parents=True, exist_ok=True)  # sqlite creates the file, not its directory
        return MlflowClient(tracking_uri=self.tracking_uri)

    @property
    def _local(self) -> bool:
        return self.tracking_uri == f"sqlite:///{self._workdir / MLFLOW_DB}"

    @functools.cached_property
    def experiment_id(self) -> str:
        # With the default sqlite store, artifacts go beside it in the workdir (MLflow's
        # own default is ./mlruns in whatever directory the command ran from).
        artifact_uri = (self._workdir / ARTIFACTS_DIR).as_uri() if self._local else None
        return self._experiment(self._experiment_name, artifact_uri)

    def _experiment(self, name: str, artifact_uri: str | None) -> str:
        found = self._client.get_experiment_by_name(name)
        if found is None:
            try:
                return self._client.create_experiment(name, artifact_location=artifact_uri)
            except MlflowException:
                # Another run created it between our lookup and create.
                found = self._client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            self._client.restore_experiment(found.experiment_id)
        return found.experiment_id

    def _create(self, name: str, tags: Mapping[str, Any]) -> TrackedRun:
        run = self._client.create_run(self.experiment_id, start_time=_now_ms(),
                                      tags={k: _clip(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()},
                                      run_name=name)
        return TrackedRun(self._client, run.info.run_id)

    def start_parent(self, *, name: str, tags: Mapping[str, Any]) -> TrackedRun:
        return self._create(name, tags)

    def start_stage(self, parent: TrackedRun, *, stage: str, key: str, cache_hit: bool,
                    produced_by: str | None = None) -> TrackedRun:
        tags = {MLFLOW_PARENT_RUN_ID: parent.run_id, "stage": stage, "cache_key": key,
                "cache_hit": "true" if cache_hit else "false"}
        if produced_by:
            tags["produced_by"] = produced_by
        return self._create(stage, tags)
