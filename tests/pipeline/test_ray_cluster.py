"""The CLI on a Ray cluster started separately (`ray start --head`), as the README's
"Running on a Ray cluster" describes: RAY_ADDRESS makes the stages run there,
and `ray job submit --working-dir .` runs the whole command there.

The head is this module's own: its own ports, temp dir and process session, with
a token of its own (RAY_AUTH_TOKEN, never ~/.ray). It is stopped by killing that
session's processes, not with `ray stop`, which stops every Ray of this user on
the machine (the owner's experiments included).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

PROJECT = Path(__file__).resolve().parents[2]
SMOKE = PROJECT / "configs" / "smoke.yaml"
RAY_EXE = Path(sys.executable).parent / "ray"
HEAD_CPUS = 2  # the smoke config's local instance would have 1 (runtime.num_workers)
# The ambient environment must not leak into the runs: a RAY_ADDRESS or token
# settings of the user's shell would change what is being tested.
_SCRUBBED = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

pytestmark = [
    pytest.mark.skipif(not RAY_EXE.is_file(), reason=f"no `ray` executable next to {sys.executable} "
                                                     "(the Ray CLI is needed to start a separate head)"),
    pytest.mark.skipif(not Path("/proc/self/stat").is_file(),
                       reason="needs /proc to find and stop the head's processes"),
]


@dataclass(frozen=True)
class Head:
    address: str  # what RAY_ADDRESS gets: 127.0.0.1:<GCS port>
    dashboard: str  # what `ray job` commands get: http://127.0.0.1:<dashboard port>
    auth_env: dict[str, str]  # what a driver needs to join (token authentication)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _SCRUBBED}


def _session_pids(sid: int, temp_dir: str) -> list[int]:
    """Live processes of the head: in its session (daemons and workers alike; Ray
    workers get their own process group but keep the session), or naming its temp dir."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:  # exited meanwhile
            continue
        # Fields after "(comm)": state, ppid, pgrp, session, ...; comm may hold spaces.
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if state != "Z" and (int(session) == sid or temp_dir.encode() in cmdline):
            pids.append(int(entry))
    return pids


def _stop_head(sid: int, temp_dir: str) -> list[int]:
    """SIGKILL the head's processes (what `ray stop --force` does, for this head only)
    until none is left; the pids still alive after ~10 s.

    Not SIGTERM: the GCS, raylet and agents take well over 5 s to act on it, and the
    temp dir they would tidy is removed anyway.
    """
    for _ in range(100):
        pids = _session_pids(sid, temp_dir)
        if not pids:
            return []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    return _session_pids(sid, temp_dir)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    # Short: Ray's unix socket paths live under it and are limited to ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    port, dashboard_port = _free_port(), _free_port()
    auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    command = [str(RAY_EXE), "start", "--head", f"--port={port}", f"--num-cpus={HEAD_CPUS}", "--num-gpus=0",
               # the dashboard serves the state API (list_jobs/list_tasks) the test asks
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
               f"--ray-client-server-port={_free_port()}", "--disable-usage-stats", f"--temp-dir={temp_dir}",
               # the agents' own ports: another Ray on this machine may hold the defaults (52365: the
               # job agent, without which `ray job submit` answers "No available agent")
               f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
               f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
    # A session of its own: every process of this head (and its workers) carries its id.
    proc = subprocess.Popen(command, env={**_base_env(), **auth_env}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        try:
            output, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            pytest.fail(f"`ray start --head` did not finish in 180 s:\n{output[-3000:]}")
        assert proc.returncode == 0, f"`ray start --head` failed ({proc.returncode}):\n{output[-3000:]}"
        yield Head(address=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dashboard_port}", auth_env=auth_env)
    finally:
        left = _stop_head(proc.pid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray head survive SIGKILL: {left}"


def run_cli(workdir: Path, stages: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", str(SMOKE), "--workdir",
                           str(workdir), "--stages", stages],
                          cwd=PROJECT, env={**_base_env(), **env}, capture_output=True, text=True, timeout=timeout)


def cluster_state(head: Head) -> dict:
    """The head's jobs and tasks, from its state API (a separate process: joining
    Ray's token mode is process-wide, and pytest's own process must stay out of it)."""
    code = ("import json, sys\n"
            "from ray.util.state import list_jobs, list_tasks\n"
            "address = sys.argv[1]\n"
            "jobs = [{'job_id': j.job_id, 'type': str(j.type), 'status': str(j.status), 'entrypoint': j.entrypoint}\n"
            "        for j in list_jobs(address=address)]\n"
            "tasks = [{'name': t.name, 'state': str(t.state), 'job_id': t.job_id}\n"
            "         for t in list_tasks(address=address, limit=10000, raise_on_missing_output=False)]\n"
            "print(json.dumps({'jobs': jobs, 'tasks': tasks}))\n")
    proc = subprocess.run([sys.executable, "-c", code, head.address], env={**_base_env(), **head.auth_env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_stages_run_on_the_cluster_named_by_ray_address(head, workdir):
    proc = run_cli(workdir, "data,proposals", {"RAY_ADDRESS": head.address, **head.auth_env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    joined = f"ray: joined the cluster at {head.address} (RAY_ADDRESS): 1 node, {HEAD_CPUS} CPUs, 0 GPUs"
    assert proc.stdout.splitlines().count(joined) == 1, proc.stdout
    assert "data       ran" in proc.stdout and "proposals  ran" in proc.stdout, proc.stdout

    state = cluster_state(head)
    drivers = [j for j in state["jobs"] if j["type"].endswith("DRIVER") and "-m pipeline run" in j["entrypoint"]
               and "--stages data,proposals" in j["entrypoint"] and str(workdir) in j["entrypoint"]]
    assert len(drivers) == 1, state["jobs"]
    assert drivers[0]["status"].endswith("SUCCEEDED"), drivers[0]
    ran = {t["name"] for t in state["tasks"]
           if t["job_id"] == drivers[0]["job_id"] and t["state"].endswith("FINISHED")}
    # stages/data.py maps generate_chunk, stages/proposals.py compute_shard
    assert {"generate_chunk", "compute_shard"} <= ran, state["tasks"]


def test_a_token_cluster_without_ray_auth_mode_exits_2_naming_it(head, workdir):
    # Ray sends no token to an explicit address unless RAY_AUTH_MODE=token. It
    # retries ~20 s before it gives up; RAY_gcs_server_port_wait_time_s shortens that.
    env = {"RAY_ADDRESS": head.address, "RAY_AUTH_TOKEN": head.auth_env["RAY_AUTH_TOKEN"],
           "RAY_gcs_server_port_wait_time_s": "2"}
    proc = run_cli(workdir, "data", env, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == (
        f"error: RAY_ADDRESS={head.address}: the Ray cluster uses token authentication; set RAY_AUTH_MODE=token "
        "(with the cluster's token in ~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) or start the "
        "cluster with RAY_AUTH_MODE=disabled")
    assert "Traceback" not in proc.stderr


def test_a_ray_address_where_nothing_listens_exits_2_naming_it(workdir):
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        proc = run_cli(workdir, "data", {"RAY_ADDRESS": address}, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr == (f"error: RAY_ADDRESS={address}: cannot reach the Ray cluster (Connection refused); "
                           "start it (ray start --head) or unset RAY_ADDRESS to run on a local Ray instance\n")


def test_ray_job_submit_with_the_project_as_working_dir(head, workdir):
    """The README's Ray Jobs commands: submit with the project as the working dir (its
    .rayignore keeps .git out), follow the logs, read the status; the workdir is an
    absolute path, where the job's outputs and MLflow store land."""
    env = {**_base_env(), **head.auth_env}

    def job(command: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(RAY_EXE), "job", command, "--address", head.dashboard, *args], cwd=PROJECT,
                              env=env, capture_output=True, text=True, timeout=timeout)

    # The cluster's Python runs the entrypoint (the README's `python`: the one the cluster has).
    command = ["--no-wait", "--working-dir", ".", "--", sys.executable, "-m", "pipeline", "run", "--config",
               "configs/smoke.yaml", "--workdir", str(workdir), "--stages", "data"]
    # A fresh head's job agent may not have registered yet: Ray says to try again.
    deadline = time.monotonic() + 120
    while True:
        submitted = job("submit", *command)
        if "No available agent to submit job" not in submitted.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = re.search(r"Job '(raysubmit_\w+)' submitted successfully", submitted.stdout + submitted.stderr)
    assert job_id, submitted.stdout + submitted.stderr
    logs = job("logs", "-f", job_id.group(1), timeout=300)  # returns when the job ends
    status = job("status", job_id.group(1))
    assert f"Job '{job_id.group(1)}' succeeded" in status.stdout, logs.stdout[-3000:] + status.stdout
    assert "ray: joined the cluster at " in logs.stdout  # the job's cluster, not a Ray of its own
    assert "data       ran" in logs.stdout, logs.stdout[-3000:]
    key = next(workdir.glob("artifacts/data/*/manifest.json"))
    assert json.loads(key.read_text())["mlflow_run_id"]
    assert (workdir / "mlflow.db").is_file()
