"""The `runtime` config section: where and how the pipeline runs.

Nothing here is part of any cache key: the same config on a laptop and on a
cluster produces the same artifacts. Re-exported by pipeline/config.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
MLFLOW_DB = "mlflow.db"


@dataclass(frozen=True)
class RuntimeConfig:
    workdir: str = field(
        default="workdir",
        metadata={"help": "directory for artifacts/ and mlflow.db (relative: to the config file; "
                          "--workdir overrides it)", "path": True})
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto", metadata={"help": "where stages run torch: auto = cuda when available, else cpu"})
    num_workers: int = field(
        default=2, metadata={"help": "CPUs of the local Ray instance that per-item maps run on", "min": 1})
    train_workers: int = field(
        default=1, metadata={"help": "Ray Train workers (one DDP process each)", "min": 1})
    ray_address: Optional[str] = field(
        default=None,
        metadata={"help": "Ray cluster to join (e.g. ray://head:10001 or auto); null: the RAY_ADDRESS "
                          "environment variable, else a local Ray instance"})


def tracking_uri_for(workdir: str | Path) -> str:
    """MLFLOW_TRACKING_URI when set, else `sqlite:///<absolute workdir>/mlflow.db`."""
    env = os.environ.get(TRACKING_URI_ENV)
    if env:
        return env
    return f"sqlite:///{Path(workdir).resolve() / MLFLOW_DB}"
