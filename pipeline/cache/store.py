"""The artifact store: `<workdir>/artifacts/<stage>/<key>/` with a manifest written last.

An output exists only once its manifest.json does: the manifest is written by
atomic rename after every other file, so a stage that raises or is killed
leaves none, and its partial files are picked up by the rerun (same key) to
resume. `<stage>/<key>.lock` (a file lock) is held while a stage produces its
output: a second run on the same workdir waits for it, then finds the manifest
and reuses the output.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from ion.atomic import TMP_SUFFIX, remove_temporaries, write_text_atomic
from ion.errors import UserError

MANIFEST = "manifest.json"
DAMAGED_MANIFEST = "manifest.damaged.json"
REPLACING_DIR = ".replacing"  # <stage>/.replacing/<key>/: a --force run's new output until it is complete
_HASH_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class ArtifactStore:
    """Stage outputs under `<workdir>/artifacts`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.root = self.workdir / "artifacts"

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def manifest(self, stage: str, key: str) -> dict[str, Any] | None:
        """The manifest of an existing output, or None when the output does not exist."""
        path = self.path(stage, key) / MANIFEST
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as err:
            # Written by atomic rename, so only an outside edit gets here.
            raise UserError(f"{path}: not a valid manifest ({err.msg}); delete it, or rerun the stage "
                            f"with --force") from None
        return manifest

    def exists(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / MANIFEST).is_file()

    def other_keys(self, stage: str, key: str) -> list[str]:
        """Keys of the finished outputs of `stage` other than `key` (an older config's)."""
        folder = self.root / stage
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.name != key and (p / MANIFEST).is_file())

    def latest_other(self, stage: str, key: str) -> dict[str, Any] | None:
        """The manifest of the most recently written output of `stage` under a key other than
        `key`: what the current config would have reused before something changed."""
        found = []
        for other in self.other_keys(stage, key):
            path = self.path(stage, other) / MANIFEST
            try:
                found.append((path.stat().st_mtime_ns, other))
            except FileNotFoundError:
                continue
        for _, other in sorted(found, reverse=True):
            try:
                manifest = self.manifest(stage, other)
            except UserError:
                continue
            if manifest is not None:
                return manifest
        return None

    def outputs(self, stage: str) -> list[Path]:
        """Every output directory of `stage`, finished or not."""
        folder = self.root / stage
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_dir() and p.name != REPLACING_DIR)

    def replacing(self, stage: str) -> list[Path]:
        """The outputs --force runs of `stage` are building aside (`prepare`), finished or not."""
        folder = self.root / stage / REPLACING_DIR
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.endswith(".old"))

    @contextlib.contextmanager
    def locked(self, stage: str, key: str, *, notify_after_s: float = 1.0) -> Iterator[None]:
        """Hold `<stage>/<key>.lock`; tell the user when another run holds it and we wait."""
        folder = self.root / stage
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / f"{key}.lock"))
        try:
            lock.acquire(timeout=notify_after_s)
        except Timeout:
            print(f"waiting for another run producing {stage} ({key[:12]}) in {self.workdir} ...",
                  file=sys.stderr, flush=True)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def prepare(self, stage: str, key: str, *, clear: bool) -> Path:
        """The directory to produce the output in, created; the caller holds the stage's lock.

        `clear` (--force) recomputes a finished output: it stays where it is, in
        use, until the new one is complete (`publish`); the new one is made in
        `<stage>/.replacing/<key>/` (the same folder name: stages may record it).
        Like any unfinished output, that folder is resumed, not wiped, when the
        same command runs again after a kill: its pieces are of this very key.
        Temporary files a killed writer left in it are removed first."""
        out = self.path(stage, key)
        if clear and self.exists(stage, key):
            out = self.root / stage / REPLACING_DIR / key
        out.mkdir(parents=True, exist_ok=True)
        remove_temporaries(out)
        return out

    def publish(self, stage: str, key: str, made: Path) -> Path:
        """Put an output made by `prepare` in place (its manifest written): for a
        --force run, the old output goes only now. Returns the output's path."""
        out = self.path(stage, key)
        if made == out:
            return out
        old = self.root / stage / REPLACING_DIR / f"{key}.old"
        if old.exists():
            shutil.rmtree(old)
        out.replace(old)
        made.replace(out)
        shutil.rmtree(old)
        return out

    def write_manifest(self, stage: str, key: str, *, version: str, upstream: dict[str, str],
                       run_id: str | None, timings: dict[str, float], metrics: dict[str, float],
                       summary: list[str], out: Path | None = None,
                       material: dict[str, Any] | None = None) -> dict[str, Any]:
        """Checksum every file of the output (in `out`, default its place) and write
        manifest.json last, atomically.

        `material` is what the key was made of (pipeline.graph.key_material): `status` compares
        it with the current one to say why an output is stale."""
        out = self.path(stage, key) if out is None else out
        files = {}
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            rel = path.relative_to(out).as_posix()
            if rel in (MANIFEST, DAMAGED_MANIFEST) or rel.endswith(TMP_SUFFIX):
                continue
            files[rel] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
        manifest = {
            "stage": stage,
            "key": key,
            "version": version,
            "upstream": upstream,
            "files": files,
            "mlflow_run_id": run_id,
            "timings": timings,
            "metrics": metrics,
            "summary": summary,
            "material": material,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return manifest

    def damaged(self, stage: str, key: str) -> list[str]:
        """Files of an existing output that do not match its manifest ("manifest.json"
        itself when it cannot be read). HDF5 files are checked by size only: they
        carry their own per-chunk checksums (fletcher32), checked as they are read,
        and hashing gigabytes of proposals on every run would cost more than the check
        is worth."""
        try:
            manifest = self.manifest(stage, key)
        except UserError:
            return [MANIFEST]
        if manifest is None:
            return []
        out = self.path(stage, key)
        bad = []
        for rel, entry in sorted(manifest.get("files", {}).items()):
            path = out / rel
            if not path.is_file() or path.stat().st_size != entry.get("bytes"):
                bad.append(rel)
            elif path.suffix != ".h5" and file_sha256(path) != entry.get("sha256"):
                bad.append(rel)
        return bad

    def set_aside(self, stage: str, key: str, damaged: list[str]) -> None:
        """Make a damaged output not exist: its manifest renamed to manifest.damaged.json
        (kept for a look), the damaged files removed, so the rerun recomputes them
        and resumes from the intact pieces."""
        out = self.path(stage, key)
        manifest = out / MANIFEST
        if manifest.is_file():
            manifest.replace(out / DAMAGED_MANIFEST)
        for rel in damaged:
            if rel != MANIFEST:
                (out / rel).unlink(missing_ok=True)

    def verify(self, stage: str, key: str) -> list[str]:
        """Files of an output whose checksum no longer matches its manifest (missing ones too)."""
        manifest = self.manifest(stage, key)
        if manifest is None:
            raise FileNotFoundError(self.path(stage, key) / MANIFEST)
        out = self.path(stage, key)
        return [rel for rel, entry in sorted(manifest["files"].items())
                if not (out / rel).is_file() or file_sha256(out / rel) != entry["sha256"]]
