"""The artifact store: manifests written last and atomically, checksums, stale keys, locks."""
from __future__ import annotations

import os
import threading
import time

import pytest

from ion.errors import UserError
from pipeline.cache.store import MANIFEST, ArtifactStore, file_sha256

POLL_DEADLINE_S = 300  # far beyond any wait here: only a hang reaches it


def produce(store: ArtifactStore, key: str = "k1") -> None:
    out = store.prepare("s", key, clear=False)
    (out / "a.bin").write_bytes(b"abc")
    (out / "sub").mkdir()
    (out / "sub" / "b.txt").write_text("hello")
    store.write_manifest("s", key, version="1", upstream={"u": "k0"}, run_id="r1", timings={"run_s": 1.0},
                         metrics={"m": 2.0}, summary=["done"])


def test_output_exists_only_with_its_manifest(tmp_path):
    store = ArtifactStore(tmp_path)
    out = store.prepare("s", "k1", clear=False)
    (out / "a.bin").write_bytes(b"abc")
    assert not store.exists("s", "k1") and store.manifest("s", "k1") is None
    store.write_manifest("s", "k1", version="1", upstream={}, run_id=None, timings={}, metrics={}, summary=[])
    assert store.exists("s", "k1")
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", MANIFEST]  # no .tmp left behind


def test_manifest_records_checksums_of_every_other_file(tmp_path):
    store = ArtifactStore(tmp_path)
    produce(store)
    manifest = store.manifest("s", "k1")
    out = store.path("s", "k1")
    assert manifest["files"] == {
        "a.bin": {"sha256": file_sha256(out / "a.bin"), "bytes": 3},
        "sub/b.txt": {"sha256": file_sha256(out / "sub" / "b.txt"), "bytes": 5},
    }
    assert file_sha256(out / "a.bin") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert {k: manifest[k] for k in ("stage", "key", "version", "upstream", "mlflow_run_id", "metrics", "summary")} == {
        "stage": "s", "key": "k1", "version": "1", "upstream": {"u": "k0"}, "mlflow_run_id": "r1",
        "metrics": {"m": 2.0}, "summary": ["done"]}
    assert store.verify("s", "k1") == []
    (out / "sub" / "b.txt").write_text("changed")
    (out / "a.bin").unlink()
    assert store.verify("s", "k1") == ["a.bin", "sub/b.txt"]


def test_manifest_write_is_a_rename(tmp_path, monkeypatch):
    """A crash while the manifest is written leaves the old state: no manifest."""
    store = ArtifactStore(tmp_path)
    store.prepare("s", "k1", clear=False)

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.write_manifest("s", "k1", version="1", upstream={}, run_id=None, timings={}, metrics={}, summary=[])
    assert not store.exists("s", "k1")


def test_other_keys_and_clear(tmp_path):
    store = ArtifactStore(tmp_path)
    produce(store, "k1")
    produce(store, "k2")
    store.prepare("s", "k3", clear=False)  # unfinished: not an output
    assert store.other_keys("s", "k1") == ["k2"]
    assert store.other_keys("t", "k1") == []
    (store.path("s", "k3") / "piece.bin").write_bytes(b"done")  # a finished piece of a killed run
    (store.path("s", "k3") / f".store.h5.{2**22 + 7}.0123abcd.tmp").write_bytes(b"torn")  # SIGKILL's leftover
    out = store.prepare("s", "k3", clear=True)  # unfinished: resumed, its leftover temporaries removed
    assert out == store.path("s", "k3") and [p.name for p in out.iterdir()] == ["piece.bin"]
    out = store.prepare("s", "k1", clear=True)  # finished: kept until the new one is complete
    assert list(out.iterdir()) == [] and store.exists("s", "k1")
    (out / "piece.bin").write_bytes(b"new")  # the --force run is killed here; the same command again:
    assert store.prepare("s", "k1", clear=True) == out and (out / "piece.bin").read_bytes() == b"new"


def test_corrupt_manifest_is_a_user_error(tmp_path):
    store = ArtifactStore(tmp_path)
    produce(store)
    (store.path("s", "k1") / MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="manifest.json: not a valid manifest .* rerun the stage with --force"):
        store.manifest("s", "k1")


def test_lock_makes_the_second_holder_wait(tmp_path, capsys):
    """No sleeps to race: the first holder keeps the lock until the second has said it waits."""
    store = ArtifactStore(tmp_path)
    events = []
    first_in, release = threading.Event(), threading.Event()

    def first():
        with store.locked("s", "k1"):
            events.append("first in")
            first_in.set()
            release.wait()
            events.append("first out")

    def second():
        with store.locked("s", "k1", notify_after_s=0.1):
            events.append("second in")

    threads = [threading.Thread(target=first, daemon=True), threading.Thread(target=second, daemon=True)]
    threads[0].start()
    assert first_in.wait(timeout=POLL_DEADLINE_S), "the first thread never took the lock"
    threads[1].start()
    said = ""
    deadline = time.monotonic() + POLL_DEADLINE_S  # only a hang reaches it: it fails instead
    while "waiting for another run producing s (k1)" not in said:
        said += capsys.readouterr().err
        threads[1].join(timeout=0.05)
        assert time.monotonic() < deadline, f"the second thread never said it waits: {said!r}"
    release.set()
    for thread in threads:
        thread.join(timeout=POLL_DEADLINE_S)
        assert not thread.is_alive(), "a thread did not finish after the lock was released"
    assert events == ["first in", "first out", "second in"]


def test_force_keeps_the_old_output_until_the_new_one_is_complete(tmp_path):
    store = ArtifactStore(tmp_path)
    produce(store)
    made = store.prepare("s", "k1", clear=True)
    assert made != store.path("s", "k1") and made.name == "k1"
    assert store.exists("s", "k1") and store.verify("s", "k1") == []  # still whole and in use
    (made / "a.bin").write_bytes(b"new")
    store.write_manifest("s", "k1", version="1", upstream={}, run_id="r2", timings={}, metrics={}, summary=[],
                         out=made)
    assert store.manifest("s", "k1")["mlflow_run_id"] == "r1"  # not published yet
    assert store.publish("s", "k1", made) == store.path("s", "k1")
    assert store.manifest("s", "k1")["mlflow_run_id"] == "r2"
    assert (store.path("s", "k1") / "a.bin").read_bytes() == b"new" and store.verify("s", "k1") == []
    assert not (store.path("s", "k1") / "sub").exists() and not made.exists()


def test_damaged_files_are_found_and_set_aside(tmp_path):
    store = ArtifactStore(tmp_path)
    produce(store)
    out = store.path("s", "k1")
    assert store.damaged("s", "k1") == []
    (out / "sub" / "b.txt").write_text("")  # emptied
    (out / "a.bin").write_bytes(b"abd")  # same size, other bytes
    assert store.damaged("s", "k1") == ["a.bin", "sub/b.txt"]
    store.set_aside("s", "k1", store.damaged("s", "k1"))
    assert not store.exists("s", "k1") and (out / "manifest.damaged.json").is_file()
    assert not (out / "a.bin").exists() and not (out / "sub" / "b.txt").exists()
    (out / MANIFEST).write_text("{torn")
    assert store.damaged("s", "k1") == [MANIFEST]
