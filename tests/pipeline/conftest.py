"""The orchestration tests use tests/conftest.py's fixtures (`workdir`: a fresh
workdir with a migrated MLflow store). MLflow's quiet defaults are set before
any test imports mlflow."""
import pipeline.tracking  # noqa: F401
