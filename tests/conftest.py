"""Shared test set-up: one torch thread (the machine has 2 cores shared by
parallel test processes), the paths of the shared data sets, the session's
smoke pipeline and a migrated MLflow store to copy into fresh workdirs."""
import shutil
from pathlib import Path

import pytest

try:
    import torch
except ImportError:  # the pipeline tests do not all need torch
    torch = None
else:
    torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the project root (coco-mini, cocoapi-fake, the paper)."""
    if not SHARED.is_dir():
        raise RuntimeError(f"{SHARED} is missing: the tests need ../shared beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """configs/smoke.yaml's whole pipeline, run once per session in-process
    (tests/helpers.py); tests read it or copy its artifacts."""
    from tests.helpers import run_smoke

    yield from run_smoke(tmp_path_factory)


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store with its tables created once (migrations take seconds)."""
    from mlflow import MlflowClient

    import pipeline.tracking  # noqa: F401 (first: it sets MLflow's quiet defaults)

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
