"""Atomic file writes: the one way the project writes a file that others read.

A file is written under a temporary name in its own folder, flushed to disk,
renamed over its final name, and the folder is flushed too, so a reader (or a
run after a crash or power loss) sees either the old file or the whole new
one, never a torn one. A failed write removes its temporary file. Temporary
names are unique per writer, so two processes writing the same file never
write into each other's temporary file; the last rename wins.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TMP_SUFFIX = ".tmp"
WRITING_NOTE = "while writing "  # the note atomic_path adds to an error: the file it was writing
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}" + re.escape(TMP_SUFFIX) + "$")  # temporary_name's


def temporary_name(path: Path) -> Path:
    """A fresh temporary path beside `path` (same folder, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process: alive
    return True


def remove_temporaries(folder: Path | str, *, recursive: bool = True, dead_only: bool = False) -> int:
    """Delete the temporary files a killed writer left in `folder` (SIGKILL skips the cleanup of
    `atomic_path`: at COCO's size a torn HDF5 store is gigabytes). `dead_only`: only those whose
    writer (the pid in the name) is gone, for a folder other processes may be writing in; without it,
    the caller holds the folder (a stage output under its lock). Returns how many were removed."""
    removed = 0
    walk = os.walk(folder) if recursive else [next(os.walk(folder), (str(folder), [], []))]
    for root, _, files in walk:
        for name in files:
            match = _TEMPORARY.match(name)
            if match and not (dead_only and _alive(int(match.group(1)))):
                try:
                    os.unlink(os.path.join(root, name))
                    removed += 1
                except FileNotFoundError:
                    pass  # its writer finished or cleaned up meanwhile
    return removed


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (the rename itself) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to (by any writer:
    torch.save, h5py, PIL); when the block ends without an error, the file is
    flushed and renamed over `path`. On an error it is removed and `path` is
    left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, Exception):
            # Writers that lose the errno (torch.save: "unexpected pos") still say which file failed.
            err.add_note(f"{WRITING_NOTE}{path}")
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: Path | str, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: Path | str, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path | str, obj: Any, *, indent: int | None = 1) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent))


_COMPACT = (",", ":")
JSON_LIST_BATCH = 10_000  # list elements encoded at once by write_compact_json_atomic


def write_compact_json_atomic(path: Path | str, obj: dict[str, Any]) -> Path:
    """`json.dumps(obj, separators=(",", ":"))`, byte for byte, written a piece at a time: each
    top-level list is encoded JSON_LIST_BATCH elements at once, so the text of a large file (a COCO
    split's annotations) is never held whole, nor twice (as text and as bytes), beside its objects."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(b"{")
        for n, (key, value) in enumerate(obj.items()):
            if not isinstance(key, str):
                raise TypeError(f"write_compact_json_atomic: key {key!r} is not a string")
            f.write(("," if n else "").encode() + json.dumps(key).encode() + b":")
            if not isinstance(value, list) or not value:
                f.write(json.dumps(value, separators=_COMPACT).encode())
                continue
            f.write(b"[")
            for start in range(0, len(value), JSON_LIST_BATCH):
                text = json.dumps(value[start:start + JSON_LIST_BATCH], separators=_COMPACT)[1:-1]
                f.write(("," if start else "").encode() + text.encode())
            f.write(b"]")
        f.write(b"}")
    return Path(path)
