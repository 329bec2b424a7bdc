"""Fixtures of the orchestration tests: a migrated MLflow sqlite store copied per test."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import pipeline.tracking  # noqa: F401 (before any test imports mlflow: it sets MLflow's quiet defaults)


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store with its tables created once (migrations take seconds)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def workdir(tmp_path, mlflow_db_template, monkeypatch) -> Path:
    """A fresh workdir holding a copy of the migrated store; the default tracking URI points at it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "work"
    path.mkdir()
    shutil.copy(mlflow_db_template, path / "mlflow.db")
    return path
