"""Shared workdirs, signals and a tracking server that is not there."""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import time
from pathlib import Path

from pipeline.tracking.client import Tracker
from pipeline.tracking.pending import PENDING_FILE
from tests.faults.conftest import assert_ok, assert_one_error_line, pipeline_env, run, stage_results, start

STAGES = ("data", "proposals", "train", "detect", "tune", "evaluate")


def run_statuses(workdir: Path) -> list[str]:
    with sqlite3.connect(workdir / "mlflow.db") as db:
        return [row[0] for row in db.execute("SELECT status FROM runs")]


def closed_port() -> int:
    """A port where nothing listens: bound, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_runs_started_together_on_a_fresh_workdir_both_succeed(shared_run):
    for proc in shared_run.together:
        assert_ok(proc)
        assert set(stage_results(proc.stdout)) == set(STAGES)
    # Each stage was computed once: whichever run did not produce it waited and reused it.
    for stage in STAGES:
        produced = [stage_results(p.stdout)[stage] for p in shared_run.together].count("ran")
        assert produced == 1, (stage, [p.stdout for p in shared_run.together])
    assert_ok(shared_run.third)
    assert stage_results(shared_run.third.stdout) == {stage: "cached" for stage in STAGES}
    assert set(run_statuses(shared_run.workdir)) == {"FINISHED"}


def test_sigterm_during_training_marks_runs_killed_and_the_rerun_resumes(shared_run, tmp_path):
    workdir = shared_run.copy(tmp_path)
    # A longer second phase: a new train key, so this run trains (data and proposals are cached).
    args = ("--stages", "train", "-o", "train.phases[1].iterations=6")
    proc = start(workdir, *args)
    cached_key = shared_run.artifact("train").name
    deadline = time.monotonic() + 600
    checkpoint = None
    while checkpoint is None and proc.poll() is None and time.monotonic() < deadline:
        found = [p for p in (workdir / "artifacts" / "train").glob("*/checkpoints/last.pt")
                 if p.parents[1].name != cached_key]
        checkpoint = found[0] if found else None
        time.sleep(0.2)
    assert checkpoint is not None, proc.communicate()
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr and "error:" not in stderr, stderr[-3000:]
    assert "interrupted (training stopped after iteration" in stderr or "interrupted (stopped by SIGTERM)" in stderr
    statuses = run_statuses(workdir)
    assert "RUNNING" not in statuses and "KILLED" in statuses, statuses
    assert not (checkpoint.parents[1] / "manifest.json").exists()

    rerun = run(workdir, *args)
    assert_ok(rerun)
    assert stage_results(rerun.stdout)["train"] == "ran"
    assert "resumed at iteration" in rerun.stdout, rerun.stdout
    assert "RUNNING" not in run_statuses(workdir)


def test_unreachable_tracking_server_is_one_line_before_any_stage(shared_run, tmp_path):
    workdir = shared_run.copy(tmp_path)
    uri = f"http://127.0.0.1:{closed_port()}"
    began = time.monotonic()
    proc = run(workdir, "--stages", "data", env=pipeline_env(MLFLOW_TRACKING_URI=uri))
    seconds = time.monotonic() - began
    assert_one_error_line(proc, f"MLFLOW_TRACKING_URI={uri}: the MLflow server does not answer")
    assert "stage" not in proc.stdout.split("\n", 1)[-1], proc.stdout  # no stage started, no summary
    print(f"closed port reported in {seconds:.1f} s")


def test_records_for_a_server_that_does_not_answer_are_kept_and_sent_later(tmp_path):
    """A store lost mid-run: the runs go on, their records are kept in the workdir
    and sent once a store answers (here the workdir's own sqlite store)."""
    down = Tracker(tracking_uri=f"http://127.0.0.1:{closed_port()}", experiment="faults", workdir=tmp_path)
    parent = down.start_parent(name="all", tags={"stages": "data"})
    child = down.start_stage(parent, stage="data", key="k" * 64, cache_hit=False)
    child.log_params({"data": {"num_train": 16}})
    child.log_metrics({"loss": 1.5}, step=3)
    child.finish("FINISHED")
    parent.finish("FINISHED")
    assert down.offline_error is not None
    assert down.pending.count() == 6  # 2 runs created, params, metrics, 2 terminations
    assert (tmp_path / PENDING_FILE).is_file()

    local = Tracker(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}", experiment="faults",
                    workdir=tmp_path)
    assert local.flush_pending() == 0
    assert not (tmp_path / PENDING_FILE).exists()
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        runs = dict(db.execute("SELECT name, status FROM runs"))
        (loss,) = db.execute("SELECT value FROM metrics WHERE key = 'loss' AND step = 3").fetchone()
        parents = [row[0] for row in db.execute("SELECT value FROM tags WHERE key = 'mlflow.parentRunId'")]
        ids = [row[0] for row in db.execute("SELECT run_uuid FROM runs WHERE name = 'all'")]
    assert runs == {"all": "FINISHED", "data": "FINISHED"}
    assert loss == 1.5 and parents == ids
