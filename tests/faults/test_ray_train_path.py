"""The path every COCO and GPU config takes: training with two Ray Train workers
(`runtime.train_workers=2`) and a real `mlflow server` (127.0.0.1, a free port,
a sqlite backend in the test's folder), faults done to real processes.

- `--force`: a second signal stops at once (the workers frozen, so nothing else
  could end the command) and nothing of it is trusted; then SIGTERM to the
  driver mid-phase with no periodic checkpoint near: exit 143, the same command
  resumes from that very iteration and ends bitwise equal to an uninterrupted
  run with two workers.
- The MLflow server killed mid-training: training finishes; once the server is
  back, the next command leaves the whole loss curve in the train run.
- A seeded sequence of faults at moments drawn from the seed (SIGTERM of the
  driver, SIGKILL of one Ray Train worker, SIGKILL of the driver with all its
  processes, the MLflow server killed and restarted), each followed by the same
  command: weights, tuned thresholds and test metrics equal the uninterrupted
  run's, and no MLflow run is left RUNNING.

A fault fires when the training progress rank 0 reports (the file the driver
prints its progress lines from) reaches an iteration drawn from the seed, not
after a delay. The data and proposals stages are the session's smoke outputs.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline.config import PROJECT_ROOT
from tests.faults.conftest import RUN_TIMEOUT_S, assert_ok, pipeline_env
from tests.helpers import copy_artifact

PHASES = (14, 10)  # iterations: room for every fault before training ends
TOTAL = sum(PHASES)
OVERRIDES = ["-o", "runtime.train_workers=2", "-o", "runtime.num_workers=2", "-o", "train.checkpoint_every=1000",
             "-o", f"train.phases[0].iterations={PHASES[0]}", "-o", f"train.phases[1].iterations={PHASES[1]}"]
DOWNSTREAM = "train,detect,tune,evaluate"
CHAOS_SEED = 22
POLL_S = 0.05


def command(workdir: Path, stages: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", "--config", "smoke", "--workdir", str(workdir),
            "--stages", stages, *OVERRIDES]


def start(workdir: Path, stages: str, env: dict[str, str]) -> subprocess.Popen:
    stale = progress_file(workdir)  # a killed command's: its progress is not this command's
    if stale is not None and not (stale.parents[1] / "manifest.json").exists():  # (a finished output's stays)
        stale.unlink()
    # A session of its own: a SIGKILL of the command takes its Ray processes with it, as a lost machine would.
    return subprocess.Popen(command(workdir, stages), cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 (its process group killed with SIGKILL, then started again)."""

    def __init__(self, folder: Path, store_template: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.db = folder / "server.db"
        shutil.copy(store_template, self.db)  # migrated once per session
        self.artifacts = folder / "artifacts"
        self.log = folder / "server.log"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**pipeline_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: a faster start
        with open(self.log, "a", encoding="utf-8") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.db}",
                 "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1"], cwd=self.db.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + 300
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow server did not listen within 300 s"
                time.sleep(0.2)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def rows(self, sql: str) -> list[tuple]:
        with sqlite3.connect(self.db) as db:
            return list(db.execute(sql))


@pytest.fixture()
def mlflow_server(tmp_path, mlflow_db_template):
    server = MlflowServer(tmp_path / "mlflow-server", mlflow_db_template)
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def upstream(smoke_run, tmp_path_factory) -> Path:
    """The smoke run's data and proposals outputs (cache hits for these overrides)."""
    folder = tmp_path_factory.mktemp("ray-train-upstream")
    for stage in ("data", "proposals"):
        copy_artifact(smoke_run.dirs[stage], folder / "artifacts" / stage)
    return folder


def new_workdir(upstream: Path, target: Path, store_template: Path) -> Path:
    shutil.copytree(upstream / "artifacts", target / "artifacts")
    shutil.copy(store_template, target / "mlflow.db")
    return target


@pytest.fixture(scope="module")
def reference(upstream, tmp_path_factory, mlflow_db_template) -> Path:
    """The uninterrupted run with two workers: train to evaluate."""
    workdir = new_workdir(upstream, tmp_path_factory.mktemp("reference") / "work", mlflow_db_template)
    began = time.monotonic()
    done = finish(start(workdir, DOWNSTREAM, pipeline_env()))
    assert_ok(done)
    print(f"reference run: {time.monotonic() - began:.0f} s")
    return workdir


def output(workdir: Path, stage: str) -> Path:
    found = [p for p in (workdir / "artifacts" / stage).iterdir() if (p / "manifest.json").is_file()]
    assert len(found) == 1, found
    return found[0]


def progress_file(workdir: Path) -> Path | None:
    found = list((workdir / "artifacts" / "train").glob("*/ray/train.progress.json"))
    return found[0] if found else None


def training_done(workdir: Path) -> int:
    """Iterations done, as rank 0 last reported them (0 before the first report)."""
    path = progress_file(workdir)
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["done"]) if path else 0
    except (OSError, ValueError):
        return 0


def wait_for_iteration(workdir: Path, proc: subprocess.Popen, iteration: int) -> bool:
    """Until rank 0 reports `iteration` done; False when the command ended first."""
    while training_done(workdir) < iteration:
        if proc.poll() is not None:
            return False
        time.sleep(POLL_S)
    return True


def assert_same_weights(workdir: Path, reference: Path) -> None:
    got = torch.load(output(workdir, "train") / "final.pt", weights_only=True)["model"]
    want = torch.load(output(reference, "train") / "final.pt", weights_only=True)["model"]
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert different == [], different


def test_mlflow_server_killed_mid_training_then_restarted(upstream, tmp_path, mlflow_db_template, mlflow_server):
    workdir = new_workdir(upstream, tmp_path / "work", mlflow_db_template)
    env = pipeline_env(MLFLOW_TRACKING_URI=mlflow_server.uri)
    began = time.monotonic()
    proc = start(workdir, "train", env)
    assert wait_for_iteration(workdir, proc, 3), finish(proc).stderr[-3000:]
    mlflow_server.kill()
    done = finish(proc)
    assert_ok(done)  # training did not stop for the tracking store
    assert "tracking: " in done.stdout and " record(s) wait in " in done.stdout, done.stdout[-3000:]
    assert "tracking record(s) not sent" in done.stdout, done.stdout[-3000:]

    mlflow_server.start()
    again = finish(start(workdir, "train", env))
    assert_ok(again)
    assert "train      cached" in again.stdout, again.stdout[-3000:]
    assert not (workdir / "mlflow_pending.jsonl").exists()
    [(run_id,)] = mlflow_server.rows("SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                                     "WHERE t.key = 'cache_hit' AND t.value = 'false' AND r.name = 'train'")
    steps = [row[0] for row in mlflow_server.rows(
        f"SELECT step FROM metrics WHERE run_uuid = '{run_id}' AND key = 'loss' ORDER BY step")]
    assert steps == list(range(1, TOTAL + 1))  # the whole curve (log_every 1), each point once
    assert {row[0] for row in mlflow_server.rows("SELECT status FROM runs")} == {"FINISHED"}
    print(f"mlflow server killed mid-training, restarted, next command: {time.monotonic() - began:.0f} s")


@dataclass
class Chaos:
    """The seeded sequence of faults and what happened."""

    faults: list[str]
    at: list[int]  # the training iteration each fault waits for
    log: list[str]


def chaos_plan(seed: int) -> Chaos:
    rng = random.Random(seed)
    faults = rng.sample(["sigterm_driver", "kill_train_worker", "kill_driver", "kill_mlflow"], 4)
    at, moment = [], 0
    for _ in faults:
        moment += rng.randint(2, 3)
        at.append(moment)
    return Chaos(faults=faults, at=at, log=[])


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def train_worker_pids(driver: int) -> list[int]:
    pids = []
    for pid in descendants(driver):
        try:
            if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return sorted(pids)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the Ray Train workers in /proc")
def test_chaos_of_the_multi_worker_path_ends_as_the_uninterrupted_run(upstream, reference, tmp_path,
                                                                      mlflow_db_template, mlflow_server):
    workdir = new_workdir(upstream, tmp_path / "work", mlflow_db_template)
    env = pipeline_env(MLFLOW_TRACKING_URI=mlflow_server.uri)
    plan = chaos_plan(CHAOS_SEED)
    rng = random.Random(CHAOS_SEED + 1)
    began = time.monotonic()
    proc, results = start(workdir, DOWNSTREAM, env), []
    for fault, iteration in zip(plan.faults, plan.at):
        assert wait_for_iteration(workdir, proc, iteration), (
            f"the command ended before iteration {iteration} ({fault}): {finish(proc).stderr[-3000:]}")
        plan.log.append(f"{fault} at iteration {training_done(workdir)}")
        if fault == "sigterm_driver":
            os.kill(proc.pid, signal.SIGTERM)
            results.append(finish(proc))
            assert results[-1].returncode == 128 + signal.SIGTERM, results[-1].stderr[-3000:]
        elif fault == "kill_driver":  # with every process of the command, the Ray Train workers included
            everything = descendants(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            for pid in everything:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            results.append(finish(proc))
        elif fault == "kill_train_worker":
            workers = train_worker_pids(proc.pid)
            assert len(workers) == 2, workers
            os.kill(rng.choice(workers), signal.SIGKILL)  # Ray Train restarts the group from its checkpoint
            continue
        elif fault == "kill_mlflow":
            mlflow_server.kill()  # the command goes on; the server comes back before the next one
            continue
        if mlflow_server.proc is None:
            mlflow_server.start()
        proc = start(workdir, DOWNSTREAM, env)
    last = finish(proc)
    if mlflow_server.proc is None:  # the last fault was the server's: the next command sends the records
        mlflow_server.start()
        assert_ok(last)
        last = finish(start(workdir, DOWNSTREAM, env))
    assert_ok(last)
    for done in results:
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
    seconds = time.monotonic() - began

    assert_same_weights(workdir, reference)
    for stage, name in (("tune", "best.json"), ("evaluate", "metrics.json")):  # tuned thresholds, test metrics
        got, want = (json.loads((output(w, stage) / name).read_text()) for w in (workdir, reference))
        assert got == want, stage
    assert not (workdir / "mlflow_pending.jsonl").exists()
    statuses = mlflow_server.rows("SELECT name, status FROM runs WHERE status = 'RUNNING'")
    assert statuses == [], statuses
    # The run that produced the train output (its manifest names it) holds the whole loss curve, each point once.
    run_id = json.loads((output(workdir, "train") / "manifest.json").read_text())["mlflow_run_id"]
    steps = [row[0] for row in mlflow_server.rows(
        f"SELECT step FROM metrics WHERE run_uuid = '{run_id}' AND key = 'loss' ORDER BY step")]
    train_runs = mlflow_server.rows("SELECT r.run_uuid, r.status, t.value FROM runs r JOIN tags t ON "
                                    "t.run_uuid = r.run_uuid WHERE t.key = 'cache_hit' AND r.name = 'train'")
    assert steps == list(range(1, TOTAL + 1)), (run_id, train_runs)
    print(f"chaos ({', '.join(plan.log)}): {seconds:.0f} s")



def force_progress(workdir: Path) -> int:
    """Iterations done in the output a --force run builds aside (0 before the first report)."""
    found = list((workdir / "artifacts" / "train" / ".replacing").glob("*/ray/train.progress.json"))
    try:
        return int(json.loads(found[0].read_text(encoding="utf-8"))["done"]) if found else 0
    except (OSError, ValueError):
        return 0


def published_run(workdir: Path) -> str:
    return json.loads((output(workdir, "train") / "manifest.json").read_text())["mlflow_run_id"]


def stop_twice_with_workers_frozen(args: list[str], log: Path) -> int:
    """Start the command; once its Ray Train workers exist, freeze them (SIGSTOP), then SIGTERM the
    driver, and again once it says it waits for the current iteration: frozen workers never finish
    one, so only stopping at once ends the command. Returns its exit status."""
    with open(log, "w", encoding="utf-8") as err:  # read while it runs: the stop request's line
        proc = subprocess.Popen(args, cwd=PROJECT_ROOT, env=pipeline_env(), stdout=subprocess.DEVNULL, stderr=err,
                                text=True, start_new_session=True)
    everything: list[int] = []
    try:
        while len(workers := train_worker_pids(proc.pid)) < 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(POLL_S)
        everything = descendants(proc.pid)
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        os.kill(proc.pid, signal.SIGTERM)
        while "send it again to stop at once" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(POLL_S)
        os.kill(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"a second SIGTERM did not stop the command: {log.read_text()[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in everything:  # the frozen workers, wherever Ray put them
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def test_sigterm_with_two_workers_keeps_the_current_iteration(upstream, reference, tmp_path, mlflow_db_template):
    """`--force` with two workers (a plain run resumes the same way, from its own folder). A second
    signal stops at once (the workers frozen): nothing of it is trusted, the old output stays.
    A single SIGTERM keeps the current iteration and the same command resumes there
    (not from 0), ending as the uninterrupted run."""
    workdir = new_workdir(upstream, tmp_path / "work", mlflow_db_template)
    copy_artifact(output(reference, "train"), workdir / "artifacts" / "train")  # what --force recomputes
    old_run = published_run(workdir)
    args = [*command(workdir, "train"), "--force"]
    began = time.monotonic()

    log = tmp_path / "twice.stderr"
    returncode = stop_twice_with_workers_frozen(args, log)
    err = log.read_text()
    assert returncode in (128 + signal.SIGTERM, 128 + signal.SIGINT), (returncode, err[-3000:])
    marker = "interrupted (training stopped after iteration "
    assert "Traceback" not in err and marker not in err, err[-3000:]
    assert published_run(workdir) == old_run

    for stale in (workdir / "artifacts" / "train" / ".replacing").glob("*/ray/train.progress.json"):
        stale.unlink()  # the frozen command's
    proc = subprocess.Popen(args, cwd=PROJECT_ROOT, env=pipeline_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    while force_progress(workdir) < 2:
        assert proc.poll() is None, finish(proc).stderr[-3000:]
        time.sleep(POLL_S)
    os.kill(proc.pid, signal.SIGTERM)
    stopped = finish(proc)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert marker in stopped.stderr and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    iteration = int(stopped.stderr.split(marker, 1)[1].split(";", 1)[0])
    [last] = (workdir / "artifacts" / "train" / ".replacing").glob("*/checkpoints/last.pt")
    assert torch.load(last, weights_only=True)["iteration"] == iteration >= 2
    assert published_run(workdir) == old_run
    with sqlite3.connect(workdir / "mlflow.db") as db:
        statuses = {row[0] for row in db.execute("SELECT status FROM runs")}
    assert "RUNNING" not in statuses and "KILLED" in statuses, statuses

    again = subprocess.run(args, cwd=PROJECT_ROOT, env=pipeline_env(), capture_output=True, text=True,
                           timeout=RUN_TIMEOUT_S)
    assert_ok(again)
    if iteration < TOTAL:  # (a machine fast enough to finish before the stop request lands resumes nothing)
        assert f"resumed at iteration {iteration})" in again.stdout, again.stdout[-3000:]
    assert published_run(workdir) != old_run
    assert_same_weights(workdir, reference)
    print(f"--force: two signals, then SIGTERM at iteration {iteration}, rerun: {time.monotonic() - began:.0f} s")
