"""Where the pipeline keeps its runs: the MLflow store (MLFLOW_TRACKING_URI, else the workdir's
mlflow.db), the experiment of a config, and the UI address of its runs table."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MLFLOW_DB", "TRACKING_URI_ENV", "WORKDIR_ENV", "experiment_name", "runs_url", "tracking_uri_for", "ui_hint"]

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
WORKDIR_ENV = "ION_WORKDIR"  # the workdir, in every Ray worker (pipeline/cluster/tasks.py)
MLFLOW_DB = "mlflow.db"


def tracking_uri_for(workdir: str | Path) -> str:
    """MLFLOW_TRACKING_URI when set, else `sqlite:///<absolute workdir>/mlflow.db`."""
    env = os.environ.get(TRACKING_URI_ENV)
    if env:
        return env
    return f"sqlite:///{Path(workdir).resolve() / MLFLOW_DB}"


# Prefixed so that no experiment of ours reads like MLflow's own "Default" (a config named default).
EXPERIMENT_PREFIX = "ion-"
UI_PORT = 5000  # `mlflow ui`'s default port


def experiment_name(name: str) -> str:
    """The MLflow experiment of config (or command) `name`: ion-<name>."""
    return f"{EXPERIMENT_PREFIX}{name}"


def runs_url(base: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's runs table (MLflow 3 opens on an overview otherwise)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"


def ui_hint(tracking_uri: str, experiment_id: str | None = None) -> str:
    """The line that shows the runs: an `mlflow ui` command and the runs table's address,
    or the server's."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {runs_url(tracking_uri, experiment_id) if experiment_id else tracking_uri}"
    command = f"mlflow ui --backend-store-uri {tracking_uri} --port {UI_PORT}"
    if experiment_id is None:
        return command
    return f"{command}, then open {runs_url(f'http://127.0.0.1:{UI_PORT}', experiment_id)}"
