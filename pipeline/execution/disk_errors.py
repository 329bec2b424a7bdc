"""A disk that cannot take a run's writes: full (ENOSPC, EDQUOT), read-only
(EROFS) or not writable (EACCES, EPERM), wherever it surfaces (an HDF5 store,
a checkpoint, the run log, the MLflow sqlite store, the pending file, a Ray
worker). One place turns any of them into the one line the CLI prints before
exiting with status 2: the path, the free space there and the fix.

The libraries report the same fault in their own words: an OSError with an
errno (Python's own writes), an OSError or RuntimeError whose text carries it
(h5py: "errno = 28", torch.save: "file write failed", "unexpected pos"),
sqlite's "database or disk is full" / "attempt to write a readonly database"
inside MLflow's and SQLAlchemy's exceptions, or a Ray task error wrapping any
of these. The exception chain is searched for the first that says which.
Writes are atomic (ion/atomic.py) and stage outputs get their manifest last,
so nothing half-written is trusted afterwards, and the rerun resumes.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from ion.atomic import WRITING_NOTE
from ion.errors import UserError

FULL = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY = (errno.EROFS,)
DENIED = (errno.EACCES, errno.EPERM)

# Texts that name the fault where no errno is attached.
_FULL_TEXT = re.compile(r"No space left on device|database or disk is full|Disk quota exceeded|errno = 28\b"
                        r"|errno=28\b|\[Errno 28\]", re.IGNORECASE)
_READ_ONLY_TEXT = re.compile(r"Read-only file system|readonly database|errno = 30\b|\[Errno 30\]", re.IGNORECASE)
_DENIED_TEXT = re.compile(r"\[Errno 13\] Permission denied|errno = 13\b", re.IGNORECASE)
# Writers that lose the errno (torch.save's zip writer): a disk fault only when the disk is full or read-only.
_WRITE_FAILED_TEXT = re.compile(r"file write failed|unexpected pos \d+ vs \d+|disk I/O error", re.IGNORECASE)
_NAMED_PATH = re.compile(r"name = '([^']+)'|filename[= ]'([^']+)'|'(/[^']+)'")
_LOW_SPACE = 64 << 20  # below this much free space, an errno-less write failure is taken for a full disk
_MAX_CHAIN = 32


def _chain(err: BaseException):
    """The exception, its causes and contexts, and what Ray wraps (`cause`), each once."""
    seen, todo = set(), [err]
    while todo and len(seen) < _MAX_CHAIN:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free(path: Path) -> str:
    try:
        free = shutil.disk_usage(_existing(path)).free
    except OSError:
        return "free space unknown"
    return f"{free / 1e6:.1f} MB free"


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(_existing(path)).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _low_space(path: Path) -> bool:
    try:
        return shutil.disk_usage(_existing(path)).free < _LOW_SPACE
    except OSError:
        return False


def _named(err: BaseException) -> Path | None:
    """The file an error names: its filename, the file atomic_path was writing, or one in its text."""
    filename = getattr(err, "filename", None)
    if filename:
        return Path(os.fsdecode(filename))
    for note in getattr(err, "__notes__", ()):
        if note.startswith(WRITING_NOTE):
            return Path(note[len(WRITING_NOTE):])
    match = _NAMED_PATH.search(str(err))
    if match:
        return Path(next(g for g in match.groups() if g))
    return None


def _path_in(err: BaseException, default: Path) -> Path:
    return _named(err) or default


def _kind(err: BaseException, default: Path) -> int | None:
    code = getattr(err, "errno", None)
    if isinstance(err, OSError) and code in FULL + READ_ONLY + DENIED:
        return code
    text = f"{type(err).__name__}: {err}"
    if _FULL_TEXT.search(text):
        return errno.ENOSPC
    if _READ_ONLY_TEXT.search(text):
        return errno.EROFS
    if _DENIED_TEXT.search(text):
        return errno.EACCES
    if _WRITE_FAILED_TEXT.search(text):
        path = _path_in(err, default)
        if _read_only(path):
            return errno.EROFS
        if _low_space(path):
            return errno.ENOSPC
    return None


def disk_error(err: BaseException, workdir: Path | str) -> UserError | None:
    """The one-line UserError for `err` when it is a disk that cannot take the run's writes, else None.
    `workdir`: where the run writes, named when the library does not say which file failed."""
    workdir = Path(workdir)
    found = [(e, kind) for e in _chain(err) if (kind := _kind(e, workdir)) is not None]
    if found:
        # The error that names its file, else the deepest (the first to fail; the others are
        # what failed after it, such as recording the failure in a store on the same disk).
        e, kind = next(((e, k) for e, k in found if _named(e) is not None), found[-1])
        path = _path_in(e, workdir)
        rerun = "then rerun the same command: it resumes where it stopped"
        if kind in FULL:
            return UserError(f"{path}: no space left on device ({_free(path)}); free space there (python -m "
                             f"pipeline gc --yes removes outputs no config uses) or point --workdir at a larger "
                             f"disk, {rerun}")
        if kind in READ_ONLY:
            return UserError(f"{path}: read-only file system ({_free(path)}); remount it writable or point "
                             f"--workdir at a writable disk, {rerun}")
        return UserError(f"{path}: permission denied ({_free(path)}); make it writable by this user or "
                         f"point --workdir elsewhere, {rerun}")
    return None
