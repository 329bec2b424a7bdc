"""The MLflow tracking client: experiments, runs, metrics, the pending queue.

One experiment per config name, `ion-<name>` (tagged as a model-development experiment, so
`mlflow ui` opens on its training runs); one parent run per `pipeline run`
invocation, named `<config name>: <stages>`, holding the headline results;
one nested child run per stage (tags stage, cache_key, cache_hit; a cached
stage's run points to the run that produced the output with `produced_by`).
Every run is tagged with the code version (pipeline/tracking/code_version.py) and the
config file's sha256. The train stage's run holds the detector as an MLflow
model (pipeline/tracking/model.py).
Uses `MlflowClient` with explicit run ids, no global active-run state, so one
client (one import, one set of sqlite migrations) serves the whole invocation.

Faults: the sqlite store of a workdir is created (schema migrations) under a
file lock, so commands started together do not race through MLflow's
migrations; a tracking server is probed before any stage starts
(`check_reachable`); a store that stops answering mid-run does not stop the
stages: what they log is kept in `<workdir>/mlflow_pending.jsonl`
(pipeline/tracking/pending.py) and sent at the end of the run or by the next one.
"""
from __future__ import annotations

import functools
import hashlib
import re
import sqlite3
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Mapping

import requests
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH
from sqlalchemy.exc import SQLAlchemyError

from ion.errors import UserError
from ion.schema import flatten
from pipeline.tracking.code_version import code_version
from pipeline.tracking.pending import PendingRecords, Rejected, Replayed
from pipeline.tracking.run_owner import OWNER_TAG, is_gone, this_process
from pipeline.tracking.sqlite_store import drop_migration_leftovers
from pipeline.tracking.uri import MLFLOW_DB, TRACKING_URI_ENV, experiment_name, tracking_uri_for

__all__ = ["FAILED", "FINISHED", "KILLED", "TrackedRun", "Tracker", "tracking_uri_for"]

ARTIFACTS_DIR = "mlartifacts"
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"
CODE_VERSION_TAG = "code_version"
CONFIG_SHA_TAG = "config_sha256"
# MLflow 3's UI opens an experiment on the view its kind names; this one holds training runs.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


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


OFFLINE_PREFIX = "offline-"
# What a store that does not answer raises: MLflow's own errors, the HTTP
# client's (retries exhausted), the OS's (a sqlite file that went away).
STORE_ERRORS = (MlflowException, SQLAlchemyError, requests.RequestException, OSError)
# What a store answers for a record it will never take (its run was deleted in
# the UI, the store was moved aside and started anew, a param logged twice with
# two values): set aside, not retried.
_REFUSED_FOR_GOOD = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "INVALID_STATE", "BAD_REQUEST"}


def _refused_for_good(err: Exception) -> bool:
    return isinstance(err, MlflowException) and err.error_code in _REFUSED_FOR_GOOD


def highest_step(client: MlflowClient, run_id: str, key: str) -> int | None:
    """The highest step of metric `key` in run `run_id` (None when it has none); raises STORE_ERRORS."""
    return max((m.step for m in client.get_metric_history(run_id, key)), default=None)


def first_line(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]
_PROBE_TIMEOUT_S = 5.0


class TrackedRun:
    """One MLflow run, addressed by id; what cannot be sent is kept (Tracker.send)."""

    def __init__(self, tracker: "Tracker", run_id: str) -> None:
        self._tracker = tracker
        self.run_id = run_id

    @property
    def pending(self) -> PendingRecords:
        """The queue its records go to when the store does not answer."""
        return self._tracker.pending

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        stamp = _now_ms()
        rows = [[mlflow_key(k), float(v), stamp, step or 0] for k, v in metrics.items()]
        for start in range(0, len(rows), _MAX_METRICS_PER_BATCH):
            self._tracker.send({"op": "metrics", "run": self.run_id,
                                "metrics": rows[start:start + _MAX_METRICS_PER_BATCH]})

    def last_step(self, key: str) -> int | None:
        """The highest step logged for metric `key` in this run; None when none
        is, or when the store does not answer (then what is logged is queued,
        marked to skip the steps the run holds when it is replayed)."""
        return self._tracker.last_step(self.run_id, mlflow_key(key))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested values are flattened to dotted keys; values are clipped to MLflow's length limit."""
        flat = flatten(dict(params))
        items = [[mlflow_key(k), _clip(str(v), MAX_PARAM_VAL_LENGTH)] for k, v in flat.items()]
        if items:
            self._tracker.send({"op": "params", "run": self.run_id, "items": items})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [[k, _clip(str(v), MAX_TAG_VAL_LENGTH)] for k, v in tags.items()]
        if items:
            self._tracker.send({"op": "tags", "run": self.run_id, "items": items})

    def log_file(self, path: Path, artifact_dir: str | None = None) -> None:
        self._tracker.send({"op": "artifact", "run": self.run_id, "path": str(path), "dir": artifact_dir})

    def log_text(self, text: str, name: str) -> None:
        # Kept as a file of the workdir: a queued record must point at something that stays.
        folder = self._tracker.text_dir / uuid.uuid4().hex
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
        self._tracker.send({"op": "artifact", "run": self.run_id, "path": str(folder / name), "dir": None,
                            "remove": str(folder)})

    def log_dir(self, path: Path, artifact_dir: str) -> None:
        self._tracker.send({"op": "artifact", "run": self.run_id, "path": str(path), "dir": artifact_dir})

    def log_model(self, artifacts: Mapping[str, Path], config_text: str) -> None:
        """The detector as an MLflow pyfunc model under `model/` (pipeline/tracking/model.py)."""
        from pipeline.tracking.model import MODEL_ARTIFACT_PATH, save_detector_model

        # Built in the workdir, not a temporary folder: a kept record must point at something that stays.
        staging = self._tracker.text_dir / uuid.uuid4().hex
        folder = save_detector_model(staging / MODEL_ARTIFACT_PATH, dict(artifacts), config_text)
        self._tracker.send({"op": "artifact", "run": self.run_id, "path": str(folder), "dir": MODEL_ARTIFACT_PATH,
                            "remove": str(staging)})

    def log_to_model(self, path: Path, relative: str) -> None:
        """Put a file into this run's model folder at `relative` (e.g. thresholds/best.json)."""
        from pipeline.tracking.model import MODEL_ARTIFACT_PATH

        staging = self._tracker.text_dir / uuid.uuid4().hex
        staging.mkdir(parents=True, exist_ok=True)
        target = staging / Path(relative).name
        target.write_bytes(Path(path).read_bytes())
        folder = "/".join([MODEL_ARTIFACT_PATH, *Path(relative).parent.parts])
        self._tracker.send({"op": "artifact", "run": self.run_id, "path": str(target), "dir": folder,
                            "remove": str(staging)})

    def register_model(self, name: str, tags: Mapping[str, Any]) -> None:
        """A new version of registered model `name` from this run's model folder (pipeline/tracking/registry.py)."""
        self._tracker.send({"op": "register", "run": self.run_id, "name": name,
                            "tags": {k: _clip(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}})

    def tag_model_versions(self, name: str, tags: Mapping[str, Any]) -> None:
        """Tag the versions of `name` registered from this run (the evaluate stage's AP)."""
        self._tracker.send({"op": "version_tags", "run": self.run_id, "name": name,
                            "tags": {k: _clip(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}})

    def finish(self, status: str, error: str | None = None) -> None:
        if error is not None:
            self.set_tags({"error": error})
        self._tracker.send({"op": "terminate", "run": self.run_id, "status": status, "end": _now_ms()})


class Tracker:
    """The MLflow side of one `pipeline run` invocation.

    Nothing touches the store before the first run starts, so a run that stops on
    a user error (a missing upstream output) creates no database and no experiment.
    """

    def __init__(self, *, tracking_uri: str, experiment: str, workdir: Path,
                 config_file: Path | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name(experiment)
        self._workdir = Path(workdir).resolve()
        self.pending = PendingRecords(self._workdir)
        self.text_dir = self._workdir / "mlflow_texts"
        self.offline_error: str | None = None  # why records are being kept instead of sent
        self._real_ids: dict[str, str] = {}  # offline run id -> the id MLflow gave it when replayed
        self._experiments: dict[str, str] = {}  # name -> id, of the experiments replayed records go to
        self._logged_steps: dict[tuple[str, str], set[int]] = {}  # (run, key) -> steps it holds, while replaying
        self._config_file = config_file

    # ------------------------------------------------------------------ the store

    def check_reachable(self) -> None:
        """UserError naming the URI when a tracking server does not answer: probed
        with one short HTTP request before any stage starts, no MLflow retries."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        url = self.tracking_uri.rstrip("/") + "/health"
        try:
            urllib.request.urlopen(url, timeout=_PROBE_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            return  # something answers HTTP there; MLflow's own errors say the rest
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", None) or err
            raise UserError(f"{TRACKING_URI_ENV}={self.tracking_uri}: the MLflow server does not answer "
                            f"({reason}); start it (mlflow server --port <port>) or unset {TRACKING_URI_ENV} "
                            f"to track in {self._workdir / MLFLOW_DB}") from None

    @functools.cached_property
    def common_tags(self) -> dict[str, str]:
        """Tags of every run: the code version and the config file's sha256."""
        tags = {CODE_VERSION_TAG: code_version(), OWNER_TAG: this_process()}
        if self._config_file is not None and Path(self._config_file).is_file():
            tags[CONFIG_SHA_TAG] = hashlib.sha256(Path(self._config_file).read_bytes()).hexdigest()
            tags["config_file"] = str(self._config_file)
        return tags

    def run(self, run_id: str) -> TrackedRun:
        """An existing run, by id (the run that produced a cached output)."""
        return TrackedRun(self, run_id)

    @functools.cached_property
    def _client(self) -> MlflowClient:
        if not self._local:
            return MlflowClient(tracking_uri=self.tracking_uri)
        self._workdir.mkdir(parents=True, exist_ok=True)  # sqlite creates the file, not its directory
        # Creating the store runs MLflow's schema migrations, which are not safe to run
        # from two processes at once (a shared workdir): one creates, the others wait.
        with FileLock(str(self._workdir / (MLFLOW_DB + ".lock"))):
            try:
                return self._open_local()
            except (MlflowException, SQLAlchemyError) as err:
                failure = err
            try:
                repaired = drop_migration_leftovers(self._workdir / MLFLOW_DB)
            except sqlite3.Error:  # not a sqlite database at all
                repaired = False
            if not repaired:
                raise self._store_error(failure) from None
            try:  # a migration killed halfway left its temporary tables behind: dropped, try again
                return self._open_local()
            except (MlflowException, SQLAlchemyError) as err:
                raise self._store_error(err) from None

    def _open_local(self) -> MlflowClient:
        client = MlflowClient(tracking_uri=self.tracking_uri)
        client.search_experiments(max_results=1)  # creates and migrates the store now, under the lock
        return client

    def _store_error(self, err: Exception) -> UserError:
        db = self._workdir / MLFLOW_DB
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return UserError(f"{db}: the MLflow store cannot be opened ({first}); move it aside "
                         f"(mv {db} {db}.broken) and rerun: the artifacts are kept, only the run history "
                         "starts anew")

    @property
    def _local(self) -> bool:
        return self.tracking_uri == f"sqlite:///{self._workdir / MLFLOW_DB}"

    @property
    def experiment_id(self) -> str:
        return self._experiment_id(self.experiment_name)

    def known_experiment_id(self) -> str | None:
        """The experiment's id when the store gave it (None for a run that stayed offline)."""
        return self._experiments.get(self.experiment_name)

    def _experiment_id(self, name: str) -> str:
        if name not in self._experiments:
            # With the default sqlite store, artifacts go beside it in the workdir (MLflow's
            # own default is ./mlruns in whatever directory the command ran from).
            artifact_uri = (self._workdir / ARTIFACTS_DIR).as_uri() if self._local else None
            self._experiments[name] = self._experiment(name, artifact_uri)
        return self._experiments[name]

    def last_step(self, run_id: str, key: str) -> int | None:
        """The highest step of metric `key` in run `run_id`; None when there is none or the store does not answer."""
        if self.offline_error is not None or run_id.startswith(OFFLINE_PREFIX):
            return None
        try:
            return highest_step(self._client, run_id, key)
        except STORE_ERRORS as err:
            self._go_offline(err)
            return None

    def _experiment(self, name: str, artifact_uri: str | None) -> str:
        found = self._client.get_experiment_by_name(name)
        if found is None:
            try:
                return self._client.create_experiment(name, artifact_location=artifact_uri,
                                                      tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except MlflowException:
                # Another run created it between our lookup and create.
                found = self._client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            self._client.restore_experiment(found.experiment_id)
        if found.tags.get(EXPERIMENT_KIND_TAG) is None:
            self._client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id

    # ------------------------------------------------------------------ runs

    def _create(self, name: str, tags: Mapping[str, Any]) -> TrackedRun:
        record = {"op": "create_run", "run": OFFLINE_PREFIX + uuid.uuid4().hex, "name": name,
                  "experiment": self.experiment_name,
                  "tags": {k: _clip(str(v), MAX_TAG_VAL_LENGTH) for k, v in {**self.common_tags, **tags}.items()},
                  "start": _now_ms()}
        if self.offline_error is None:
            try:
                return TrackedRun(self, self._apply(record))
            except STORE_ERRORS as err:
                self._go_offline(err)
        self.pending.append(record)
        return TrackedRun(self, record["run"])

    def start_parent(self, *, name: str, tags: Mapping[str, Any]) -> TrackedRun:
        return self._create(name, tags)

    def start_stage(self, parent: TrackedRun, *, stage: str, key: str, cache_hit: bool,
                    produced_by: str | None = None) -> TrackedRun:
        tags = {MLFLOW_PARENT_RUN_ID: parent.run_id, "stage": stage, "cache_key": key,
                "cache_hit": "true" if cache_hit else "false"}
        if produced_by:
            tags["produced_by"] = produced_by
        return self._create(stage, tags)

    # ------------------------------------------------------------------ sending, or keeping

    def send(self, record: dict[str, Any]) -> None:
        """Apply one record to the store; when the store does not answer, keep it
        (and every later one, without waiting on the store again) in the pending file."""
        if self.offline_error is None and not record["run"].startswith(OFFLINE_PREFIX):
            try:
                self._apply(record)
                return
            except STORE_ERRORS as err:
                self._go_offline(err)
        self.pending.append(record)

    def _go_offline(self, err: Exception) -> None:
        self.offline_error = first_line(err)
        print(f"warning: MLflow at {self.tracking_uri} does not answer ({self.offline_error}); the stages go on "
              f"and their tracking records are kept in {self.pending.path}", flush=True)

    def flush_pending(self) -> int:
        """Send the kept records (a server back up, a store unlocked); the number
        still pending. Records the store refuses for good are set aside (one line
        says so); the rest is sent. Never raises for a store that does not answer."""
        if not self.pending.path.is_file():
            return 0
        self._logged_steps.clear()
        try:
            done = self.pending.replay(self._replay_one)
        except (UserError, *STORE_ERRORS) as err:  # a store that cannot even be opened now
            self._go_offline(err)
            return self.pending.count()
        self._report(done)
        return done.left

    def close_abandoned(self) -> int:
        """Mark KILLED this experiment's RUNNING runs whose command was killed
        (SIGKILL, pipeline/tracking/run_owner.py); how many. Never raises for a store that does not answer."""
        if self.offline_error is not None:
            return 0
        try:
            runs = self._client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
            gone = [r.info.run_id for r in runs if is_gone(r.data.tags.get(OWNER_TAG, ""))]
            for run_id in gone:
                self._client.set_tag(run_id, "error", "its command was killed (no clean-up ran)")
                self._client.set_terminated(run_id, status=KILLED)
        except (UserError, *STORE_ERRORS) as err:
            self._go_offline(err)
            return 0
        return len(gone)

    def _report(self, done: Replayed) -> None:
        if done.rejected:
            print(f"warning: MLflow refused {done.rejected} kept tracking record(s) for good (first: "
                  f"{done.first_rejection}); set aside in {self.pending.rejected_path}, the rest was sent",
                  flush=True)
        if done.torn:
            print(f"warning: dropped {done.torn} torn line(s) of {self.pending.path} (a writer was killed "
                  "mid-line)", flush=True)

    def _replay_one(self, record: dict[str, Any], ids: dict[str, str]) -> None:
        """Send one kept record (pipeline/tracking/pending.py's replay): Rejected when the store refuses it for good."""
        self._real_ids.update(ids)
        try:
            self._apply(record)
        except STORE_ERRORS as err:
            if _refused_for_good(err):
                raise Rejected(first_line(err)) from None
            raise
        finally:
            ids.update(self._real_ids)

    def _apply(self, record: dict[str, Any]) -> str:
        """Do what one record says; the run's id (the real one for a replayed offline run)."""
        run = self._real_ids.get(record["run"], record["run"])
        op = record["op"]
        if op == "create_run":
            tags = dict(record["tags"])
            parent = tags.get(MLFLOW_PARENT_RUN_ID)
            if parent is not None:
                tags[MLFLOW_PARENT_RUN_ID] = self._real_ids.get(parent, parent)
            experiment = self._experiment_id(record.get("experiment") or self.experiment_name)
            created = self._client.create_run(experiment, start_time=record["start"], tags=tags,
                                              run_name=record["name"])
            self._real_ids[record["run"]] = created.info.run_id
            return created.info.run_id
        if run.startswith(OFFLINE_PREFIX):  # its create_run was lost with a torn line
            raise Rejected(f"run {run} was never created (its create_run record was lost)")
        if op == "metrics":
            rows = record["metrics"]
            if record.get("dedupe"):
                rows = self._not_logged_yet(run, rows)
            if rows:
                self._client.log_batch(run, metrics=[Metric(key=k, value=v, timestamp=t, step=s)
                                                     for k, v, t, s in rows])
                for k, _, _, step in rows:
                    self._logged_steps.get((run, k), set()).add(step)
        elif op == "params":
            self._client.log_batch(run, params=[Param(k, v) for k, v in record["items"]])
        elif op == "tags":
            self._client.log_batch(run, tags=[RunTag(k, v) for k, v in record["items"]])
        elif op == "artifact":
            path = Path(record["path"])
            if path.is_dir():
                self._client.log_artifacts(run, str(path), artifact_path=record["dir"])
            elif path.is_file():
                self._client.log_artifact(run, str(path), artifact_path=record["dir"])
            else:
                raise Rejected(f"{path} is gone")
            if record.get("remove"):
                _remove_tree(Path(record["remove"]))
        elif op in ("register", "version_tags"):
            from pipeline.tracking import registry

            act = registry.register_version if op == "register" else registry.tag_versions
            act(self._client, run_id=run, name=record["name"], tags=record["tags"])
        elif op == "terminate":
            self._client.set_terminated(run, status=record["status"], end_time=record["end"])
        return run

    def _not_logged_yet(self, run: str, rows: list) -> list:
        """The rows whose (key, step) the run does not hold yet (a resumed worker logs its history again)."""
        for key in {row[0] for row in rows}:
            if (run, key) not in self._logged_steps:
                self._logged_steps[(run, key)] = {m.step for m in self._client.get_metric_history(run, key)}
        return [row for row in rows if row[3] not in self._logged_steps[(run, row[0])]]


def _remove_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    folder.rmdir()
