"""`python -m pipeline gc`: stage outputs that no given config uses any more.

An output is kept when its key is the current key of its stage for one of the
given configs (code and input files included, pipeline/graph.py); every other
directory under `<workdir>/artifacts/<stage>/`, finished or partial, is listed
and, with --yes, deleted (its manifest first, so a half-deleted output never
looks finished). The outputs --force runs build aside (`<stage>/.replacing/<key>/`)
are listed the same way: one of a current key is kept, so the same command
resumes it. An output whose lock a run holds is in use, being built or read:
kept, and its lock with it. Lock files are never deleted: a run may be waiting
on the very file, and a new file at the same path would let a third run in.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from filelock import FileLock, Timeout

from pipeline.cache.store import MANIFEST, ArtifactStore
from pipeline.graph import SHORT_KEY, Stage, cache_keys


@dataclass(frozen=True)
class Unused:
    stage: str
    key: str
    path: Path
    bytes: int
    finished: bool


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def unused_outputs(stages: Sequence[Stage], configs: Sequence[Any], store: ArtifactStore) -> list[Unused]:
    """Outputs under `store` whose key is not the current key of their stage for any of `configs`."""
    keep: dict[str, set[str]] = {s.name: set() for s in stages}
    for cfg in configs:
        for name, key in cache_keys(stages, cfg).items():
            keep[name].add(key)
    found = []
    for stage in stages:
        for path in store.outputs(stage.name) + store.replacing(stage.name):
            if path.name not in keep[stage.name]:
                found.append(Unused(stage=stage.name, key=path.name, path=path, bytes=_size(path),
                                    finished=(path / MANIFEST).is_file()))
    return found


def delete_output(item: Unused, store: ArtifactStore) -> bool:
    """Delete one output unless a run holds its stage lock (the one `ArtifactStore.locked` takes,
    for an output built aside too); True when deleted. The lock file stays (module docstring)."""
    lock = FileLock(str(store.root / item.stage / f"{item.key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    try:
        (item.path / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(item.path, ignore_errors=False)
    finally:
        lock.release()
    return True


def format_unused(items: Sequence[Unused], *, deleted: Sequence[bool] | None = None) -> str:
    if not items:
        return "nothing to collect: every output is used by the given config(s)"
    lines = []
    for i, item in enumerate(items):
        state = "" if item.finished else " (unfinished)"
        done = "" if deleted is None else ("  deleted" if deleted[i] else "  kept: a run holds its lock")
        lines.append(f"{item.stage:<10} {item.key[:SHORT_KEY]}  {item.bytes / 1e6:9.1f} MB{state}{done}")
    total = sum(i.bytes for i in items) / 1e6
    verb = "listed" if deleted is None else "collected"
    lines.append(f"{len(items)} output(s), {total:.1f} MB {verb}"
                 + ("; rerun with --yes to delete them" if deleted is None else ""))
    return "\n".join(lines)
