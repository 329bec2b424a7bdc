"""Repairs of the workdir's sqlite MLflow store that MLflow does not make itself."""
from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path


def drop_migration_leftovers(db: Path) -> bool:
    """Drop the `_alembic_tmp_*` tables a schema migration killed halfway leaves
    in a sqlite store (sqlite's ALTER TABLE is a copy into such a table); True when
    there were any. The migration then runs again from the recorded version."""
    if not db.is_file():
        return False
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
        names = [row[0] for row in con.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE '\\_alembic\\_tmp\\_%' ESCAPE '\\'")]
        for name in names:
            con.execute(f'DROP TABLE "{name}"')
        con.commit()
    return bool(names)
