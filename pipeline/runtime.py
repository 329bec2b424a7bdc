"""Where the pipeline keeps its MLflow store, and the `runtime` config section
(defined with the stage contract, stages/contract.py, re-exported here)."""
from __future__ import annotations

import os
from pathlib import Path

from stages.contract import RuntimeConfig

__all__ = ["MLFLOW_DB", "TRACKING_URI_ENV", "WORKDIR_ENV", "RuntimeConfig", "tracking_uri_for"]

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
WORKDIR_ENV = "ION_WORKDIR"  # the workdir, in every Ray worker (pipeline/cluster.py)
MLFLOW_DB = "mlflow.db"


def tracking_uri_for(workdir: str | Path) -> str:
    """MLFLOW_TRACKING_URI when set, else `sqlite:///<absolute workdir>/mlflow.db`."""
    env = os.environ.get(TRACKING_URI_ENV)
    if env:
        return env
    return f"sqlite:///{Path(workdir).resolve() / MLFLOW_DB}"
