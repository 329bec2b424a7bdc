"""The state cache of input files: each file's sha256 remembered against its
(device, inode, size, mtime_ns), as DVC's state database does, so a file is
hashed once and a second `status` over COCO's 120k images only stats them.

    state = InputState.open(workdir)          # <workdir>/state/inputs.sqlite
    sha = state.sha256(path, field="data.coco.train_images")
    state.record_listing(fingerprint, {"a.jpg": sha, ...})   # what a folder fingerprint covered
    state.close()                                             # one write transaction

A renamed, copied or `touch`ed file is hashed again (its stat changed) and gets
the same sha256, so nothing keyed by content changes. Besides hashes it keeps
two things keyed by content: what an annotation file names (its image ids and
file names, so a 450 MB instances json is parsed once), and the per-file
listing behind each folder fingerprint, so `status` can name the very file
that changed.

The cache is only a cache: a workdir that cannot hold it (read-only, full)
costs time, never a wrong key. Reading an input, on the other hand, must not
fail silently: an input that exists but cannot be read is a UserError naming
it (a transient NFS error would otherwise be a new key for every stage).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
import zlib
from pathlib import Path
from typing import Any, Callable

from ion.errors import UserError

STATE_DIR = "state"
STATE_FILE = "inputs.sqlite"
MISSING = "missing"
_CHUNK = 1 << 20
_BUSY_TIMEOUT_S = 30.0
_ABSENT = (errno.ENOENT, errno.ENOTDIR)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS hashes (dev INTEGER, ino INTEGER, size INTEGER, mtime_ns INTEGER, "
    "sha256 TEXT, PRIMARY KEY (dev, ino))",
    "CREATE TABLE IF NOT EXISTS derived (sha256 TEXT, what TEXT, data BLOB, PRIMARY KEY (sha256, what))",
    "CREATE TABLE IF NOT EXISTS listings (fingerprint TEXT PRIMARY KEY, data BLOB)",
)


def unreadable(path: Path | str, err: OSError, field: str = "") -> UserError:
    """The error for an input that exists but cannot be read (permissions, I/O error, a stale mount)."""
    where = f" ({field})" if field else ""
    return UserError(f"{path}{where}: cannot be read ({err.strerror or err}); fix its permissions or the "
                     f"filesystem it lives on and rerun (an unreadable input never becomes a new cache key)")


def stat_input(path: Path | str, field: str = "") -> os.stat_result | None:
    """os.stat, None when the path does not exist; any other OSError is a UserError naming it."""
    try:
        return os.stat(path)
    except OSError as err:
        if err.errno in _ABSENT:
            return None
        raise unreadable(path, err, field) from None


def _hash_file(path: Path | str, field: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_CHUNK), b""):
                digest.update(block)
    except OSError as err:
        raise unreadable(path, err, field) from None
    return digest.hexdigest()


class InputState:
    """Hashes and content-keyed facts of input files (module docstring)."""

    def __init__(self, db_path: Path | None) -> None:
        self.db_path = db_path
        self._hashes: dict[tuple[int, int], tuple[int, int, str]] | None = None
        self._new_hashes: dict[tuple[int, int], tuple[int, int, str]] = {}
        self._new_derived: dict[tuple[str, str], bytes] = {}
        self._new_listings: dict[str, bytes] = {}

    @classmethod
    def open(cls, workdir: Path | str | None) -> "InputState":
        """The state of `workdir` (memory only when None)."""
        return cls(Path(workdir) / STATE_DIR / STATE_FILE if workdir is not None else None)

    # ------------------------------------------------------------------ storage

    def _connect(self, *, create: bool) -> sqlite3.Connection | None:
        if self.db_path is None or (not create and not self.db_path.is_file()):
            return None
        try:
            if create:
                self.db_path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(self.db_path), timeout=_BUSY_TIMEOUT_S)
            for statement in _SCHEMA:
                db.execute(statement)
            return db
        except (OSError, sqlite3.Error):
            return None  # a cache the workdir cannot hold: hash again next time

    def _load_hashes(self) -> dict[tuple[int, int], tuple[int, int, str]]:
        if self._hashes is None:
            self._hashes = {}
            db = self._connect(create=False)
            if db is not None:
                try:
                    for dev, ino, size, mtime, sha in db.execute("SELECT dev, ino, size, mtime_ns, sha256 FROM hashes"):
                        self._hashes[(dev, ino)] = (size, mtime, sha)
                except sqlite3.Error:
                    pass
                finally:
                    db.close()
        return self._hashes

    def _lookup(self, table: str, column: str, where: str, args: tuple) -> bytes | None:
        db = self._connect(create=False)
        if db is None:
            return None
        try:
            row = db.execute(f"SELECT {column} FROM {table} WHERE {where}", args).fetchone()
        except sqlite3.Error:
            row = None
        finally:
            db.close()
        return row[0] if row else None

    def close(self) -> None:
        """Write what was learnt, in one transaction (nothing when there is nothing new)."""
        if not (self._new_hashes or self._new_derived or self._new_listings):
            return
        db = self._connect(create=True)
        if db is None:
            return
        try:
            with db:
                db.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?)",
                               [(dev, ino, size, mtime, sha)
                                for (dev, ino), (size, mtime, sha) in self._new_hashes.items()])
                db.executemany("INSERT OR REPLACE INTO derived VALUES (?, ?, ?)",
                               [(sha, what, data) for (sha, what), data in self._new_derived.items()])
                db.executemany("INSERT OR REPLACE INTO listings VALUES (?, ?)", list(self._new_listings.items()))
        except sqlite3.Error:
            pass  # full or read-only workdir: the next run hashes again
        finally:
            db.close()
        self._new_hashes.clear()
        self._new_derived.clear()
        self._new_listings.clear()

    # ------------------------------------------------------------------ hashes

    def sha256_of(self, path: Path | str, stat: os.stat_result, field: str = "") -> str:
        """The sha256 of a file whose stat the caller has; hashed only when its stat is new."""
        ident = (stat.st_dev, stat.st_ino)
        known = self._new_hashes.get(ident) or self._load_hashes().get(ident)
        if known is not None and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return known[2]
        sha = _hash_file(path, field)
        self._new_hashes[ident] = (stat.st_size, stat.st_mtime_ns, sha)
        return sha

    def sha256(self, path: Path | str, field: str = "") -> str:
        """The sha256 of a file, or "missing" when it does not exist."""
        stat = stat_input(path, field)
        return MISSING if stat is None else self.sha256_of(path, stat, field)

    # ------------------------------------------------------------------ content-keyed facts

    def derived(self, sha: str, what: str, compute: Callable[[], Any]) -> Any:
        """A JSON value computed from a file's content (`what` names the computation), remembered by sha256."""
        data = self._new_derived.get((sha, what)) or self._lookup("derived", "data", "sha256 = ? AND what = ?",
                                                                   (sha, what))
        if data is not None:
            return json.loads(zlib.decompress(data))
        value = compute()
        self._new_derived[(sha, what)] = zlib.compress(json.dumps(value).encode("utf-8"))
        return value

    def record_listing(self, fingerprint: str, listing: dict[str, str]) -> None:
        """Remember which files (relative name -> sha256) a folder fingerprint covered."""
        if fingerprint not in self._new_listings and self._lookup(
                "listings", "1", "fingerprint = ?", (fingerprint,)) is None:
            self._new_listings[fingerprint] = zlib.compress(json.dumps(listing, sort_keys=True).encode("utf-8"))

    def listing(self, fingerprint: str) -> dict[str, str] | None:
        """The files behind a folder fingerprint, if this workdir computed it once."""
        data = self._new_listings.get(fingerprint) or self._lookup("listings", "data", "fingerprint = ?",
                                                                   (fingerprint,))
        return json.loads(zlib.decompress(data)) if data is not None else None
