"""Where the pipeline keeps its MLflow store: MLFLOW_TRACKING_URI, else the workdir's mlflow.db."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MLFLOW_DB", "TRACKING_URI_ENV", "WORKDIR_ENV", "tracking_uri_for"]

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
WORKDIR_ENV = "ION_WORKDIR"  # the workdir, in every Ray worker (pipeline/cluster/tasks.py)
MLFLOW_DB = "mlflow.db"


def tracking_uri_for(workdir: str | Path) -> str:
    """MLFLOW_TRACKING_URI when set, else `sqlite:///<absolute workdir>/mlflow.db`."""
    env = os.environ.get(TRACKING_URI_ENV)
    if env:
        return env
    return f"sqlite:///{Path(workdir).resolve() / MLFLOW_DB}"
