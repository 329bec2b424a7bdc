"""The queue of tracking records MLflow did not take (pipeline/tracking/pending.py),
replayed into real sqlite stores: torn lines, a replay killed half-way, records
refused for good, records of several experiments, the training workers' queue,
and a replay that leaves the queue open to writers while it sends."""
from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from pipeline.config import PROJECT_ROOT
from pipeline.tracking.client import Tracker
from pipeline.tracking.pending import PENDING_FILE, REJECTED_FILE, PendingRecords


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline(workdir: Path, experiment: str = "queue") -> Tracker:
    """A tracker whose server is not there: everything it logs is queued."""
    return Tracker(tracking_uri=f"http://127.0.0.1:{closed_port()}", experiment=experiment, workdir=workdir)


def local(workdir: Path, experiment: str = "queue") -> Tracker:
    return Tracker(tracking_uri=f"sqlite:///{workdir.resolve() / 'mlflow.db'}", experiment=experiment,
                   workdir=workdir)


def queue_two_runs(workdir: Path, experiment: str = "queue") -> None:
    """A parent and a child run, made while the store was down: 2 creates, params, 3 metrics, 2 ends."""
    down = offline(workdir, experiment)
    before = down.pending.count()
    parent = down.start_parent(name="all", tags={"stages": "train"})
    child = down.start_stage(parent, stage="train", key="k" * 64, cache_hit=False)
    child.log_params({"train": {"images_per_batch": 2}})
    for step in (1, 2, 3):
        child.log_metrics({"loss": float(step)}, step=step)
    child.finish("FINISHED")
    parent.finish("FINISHED")
    assert down.pending.count() == before + 8


def db_rows(workdir: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(workdir / "mlflow.db") as db:
        return list(db.execute(sql))


def test_a_torn_line_does_not_swallow_the_next_record(workdir, capsys):
    pending = PendingRecords(workdir)
    tracker = offline(workdir)
    run = tracker.start_parent(name="all", tags={})
    # A writer killed in the middle of its line (SIGKILL, a full disk) leaves it without its end.
    with open(workdir / PENDING_FILE, "a", encoding="utf-8") as f:
        f.write('{"op": "metrics", "run": "x", "metrics": [["lo')
    run.log_metrics({"loss": 2.5}, step=7)  # appended after the torn line: still a record of its own
    run.finish("FINISHED")
    assert pending.count() == 3

    assert local(workdir).flush_pending() == 0
    assert "dropped 1 torn line(s)" in capsys.readouterr().out
    assert db_rows(workdir, "SELECT key, value, step FROM metrics") == [("loss", 2.5, 7)]
    assert db_rows(workdir, "SELECT status FROM runs") == [("FINISHED",)]


REPLAY_KILLED = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from pipeline.tracking.client import Tracker
    workdir = Path(sys.argv[1])
    tracker = Tracker(tracking_uri=f"sqlite:///{workdir.resolve() / 'mlflow.db'}", experiment="queue",
                      workdir=workdir)
    sent, apply = [], tracker._replay_one
    def replay_one(record, ids):
        if len(sent) == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # the replay dies between two records
        apply(record, ids)
        sent.append(record["op"])
    tracker._replay_one = replay_one
    tracker.flush_pending()
""")


def test_a_replay_killed_half_way_loses_and_repeats_nothing(workdir):
    queue_two_runs(workdir)
    # Killed after both runs were created and the params sent: the offline -> real
    # id map must outlive the process for the child's metrics and ends to find their run.
    killed = subprocess.run([sys.executable, "-c", REPLAY_KILLED, str(workdir), "3"], cwd=PROJECT_ROOT,
                            env={"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len(db_rows(workdir, "SELECT run_uuid FROM runs")) == 2
    assert db_rows(workdir, "SELECT COUNT(*) FROM metrics") == [(0,)]

    assert local(workdir).flush_pending() == 0
    runs = dict(db_rows(workdir, "SELECT name, run_uuid FROM runs"))
    assert sorted(runs) == ["all", "train"]  # not created a second time
    assert db_rows(workdir, "SELECT value FROM tags WHERE key = 'mlflow.parentRunId'") == [(runs["all"],)]
    assert sorted(db_rows(workdir, "SELECT run_uuid, step, value FROM metrics")) == [
        (runs["train"], step, float(step)) for step in (1, 2, 3)]
    assert db_rows(workdir, "SELECT key, value FROM params") == [("train.images_per_batch", "2")]
    assert set(db_rows(workdir, "SELECT status FROM runs")) == {("FINISHED",)}


def test_records_refused_for_good_are_set_aside_and_the_rest_is_sent(workdir, capsys):
    store = local(workdir)
    gone = store.start_parent(name="deleted in the UI", tags={})
    store._client.delete_run(gone.run_id)
    pending = PendingRecords(workdir)
    # Kept while the store was down: records of a run deleted since, and of one that never existed
    # (the store was moved aside and started anew), before two runs made offline.
    pending.append({"op": "metrics", "run": gone.run_id, "metrics": [["loss", 1.0, 0, 1]]})
    pending.append({"op": "terminate", "run": "0123456789abcdef0123456789abcdef", "status": "FINISHED", "end": 0})
    queue_two_runs(workdir)

    assert local(workdir).flush_pending() == 0
    out = capsys.readouterr().out
    assert f"MLflow refused 2 kept tracking record(s) for good (first: metrics of run {gone.run_id}" in out
    assert f"set aside in {workdir / REJECTED_FILE}, the rest was sent" in out
    rejected = [json.loads(line) for line in (workdir / REJECTED_FILE).read_text().splitlines()]
    assert [r["op"] for r in rejected] == ["metrics", "terminate"] and all(r["rejected"] for r in rejected)
    assert db_rows(workdir, "SELECT COUNT(*) FROM metrics") == [(3,)]
    assert not (workdir / PENDING_FILE).exists()
    assert local(workdir).flush_pending() == 0  # nothing blocks the queue any more


def test_each_record_keeps_its_experiment(workdir):
    # Two commands (ablation variants) of one workdir, each with its experiment, queued while down.
    queue_two_runs(workdir, experiment="variant a")
    queue_two_runs(workdir, experiment="variant b")
    assert local(workdir, experiment="something else").flush_pending() == 0
    placed = db_rows(workdir, "SELECT e.name, r.name FROM runs r JOIN experiments e "
                              "ON r.experiment_id = e.experiment_id ORDER BY e.name, r.name")
    # Each config's experiment is ion-<config name> (no experiment reads like MLflow's own "Default").
    assert placed == [("ion-variant a", "all"), ("ion-variant a", "train"), ("ion-variant b", "all"),
                      ("ion-variant b", "train")]


def test_a_replay_sends_without_holding_the_queue_lock(workdir):
    queue_two_runs(workdir)
    writer = PendingRecords(workdir)
    tracker = local(workdir)
    apply, free = tracker._replay_one, []

    def replay_one(record, ids):
        # Another process's lock on the same file: free while a record is sent.
        lock = type(writer._lock)(str(writer.path) + ".lock")
        lock.acquire(timeout=5)
        lock.release()
        free.append(True)
        if len(free) == 1:  # a record appended meanwhile stays queued
            writer.append({"op": "metrics", "run": "0123456789abcdef0123456789abcdef",
                           "metrics": [["loss", 1.0, 0, 1]]})
        apply(record, ids)

    tracker._replay_one = replay_one
    assert tracker.flush_pending() == 1
    assert len(free) == 8
    assert [json.loads(line)["run"] for line in (workdir / PENDING_FILE).read_text().splitlines()] == [
        "0123456789abcdef0123456789abcdef"]


def test_training_workers_queue_what_the_store_does_not_take(workdir, monkeypatch):
    """A Ray Train worker's run (pipeline/cluster/train.py WorkerSession) with the
    server down: its points are queued, not dropped, and the replay adds only the
    steps the run does not hold (a resumed worker logs its history again)."""
    from pipeline.tracking.worker import run_by_id

    store = local(workdir)
    run = store.start_parent(name="train", tags={})
    run.log_metrics({"loss": 1.0}, step=1)  # logged live before the server went down
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("ION_WORKDIR", str(workdir))
    worker = run_by_id(run.run_id)
    assert worker.last_step("loss") is None  # the history cannot be read: no error, queued from here
    for step in (1, 2, 3):
        worker.log_metrics({"loss": float(step)}, step=step)
    assert PendingRecords(workdir).count() == 3

    assert local(workdir).flush_pending() == 0
    assert sorted(db_rows(workdir, "SELECT step, value FROM metrics")) == [(1, 1.0), (2, 2.0), (3, 3.0)]
