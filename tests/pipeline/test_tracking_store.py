"""The workdir's MLflow store: created once under a lock, leftovers of a killed
migration dropped, a store that cannot be opened reported in one line."""
from __future__ import annotations

import sqlite3

import pytest

from ion.errors import UserError
from pipeline.tracking.client import Tracker
from pipeline.tracking.sqlite_store import drop_migration_leftovers


def local_tracker(workdir):
    return Tracker(tracking_uri=f"sqlite:///{workdir.resolve() / 'mlflow.db'}", experiment="t", workdir=workdir)


def test_leftover_migration_tables_are_dropped(tmp_path):
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE metrics (key TEXT)")
        con.execute("CREATE TABLE _alembic_tmp_metrics (key TEXT)")
    assert drop_migration_leftovers(db)
    with sqlite3.connect(db) as con:
        assert [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["metrics"]
    assert not drop_migration_leftovers(db)
    assert not drop_migration_leftovers(tmp_path / "absent.db")


def test_a_store_that_is_not_a_database_is_one_line_with_the_fix(tmp_path):
    (tmp_path / "mlflow.db").write_bytes(b"not a sqlite file, " * 300)
    with pytest.raises(UserError, match=r"mlflow.db: the MLflow store cannot be opened \(.*file is not a database"
                                        r".*\); move it aside \(mv .*mlflow.db .*mlflow.db.broken\)"):
        local_tracker(tmp_path).start_parent(name="all", tags={})


def test_store_is_created_and_used(tmp_path):
    tracker = local_tracker(tmp_path)
    run = tracker.start_parent(name="all", tags={"k": "v"})
    run.log_metrics({"AP@.5": 0.5}, step=1)
    run.finish("FINISHED")
    assert tracker.offline_error is None and tracker.pending.count() == 0
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        assert con.execute("SELECT status FROM runs").fetchall() == [("FINISHED",)]
        assert con.execute("SELECT key, value FROM metrics").fetchall() == [("AP_at_.5", 0.5)]
