"""RPN training in the proposals stage resumes exactly: `python -m pipeline run`
killed with SIGKILL during RPN training (once a checkpoint exists), then rerun,
ends with rpn.pt bitwise equal to an uninterrupted run's.

40 RPN iterations (checkpoint every 5) rather than hundreds: the kill lands
between checkpoints either way, and each run stays well under a minute."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.config import PROJECT_ROOT
from tests.helpers import copy_artifact

ITERATIONS, CHECKPOINT_EVERY = 40, 5
OVERRIDES = ["-o", f"proposals.rpn.iterations={ITERATIONS}", "-o", f"proposals.rpn.checkpoint_every={CHECKPOINT_EVERY}"]


def _command(workdir: Path, stages: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", "--config", "smoke", "--stages", stages,
            "--workdir", str(workdir), *OVERRIDES]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")])
    return env


def _run(workdir: Path, stages: str) -> None:
    started = time.monotonic()
    done = subprocess.run(_command(workdir, stages), cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"{workdir.name} --stages {stages}: {time.monotonic() - started:.0f} s")


def _rpn_dir(workdir: Path) -> Path:
    [out] = [p for p in (workdir / "artifacts" / "proposals").iterdir() if p.is_dir()]
    return out


def test_killed_rpn_training_resumes_bitwise_equal(smoke_run, mlflow_db_template, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # The smoke run's data stage output (the overrides change only proposals): a cache hit in both.
    for workdir in (whole, killed):
        copy_artifact(smoke_run.dirs["data"], workdir / "artifacts" / "data")
        shutil.copy(mlflow_db_template, workdir / "mlflow.db")  # migrated once per session
    # The uninterrupted run goes on beside the one that is killed and resumed.
    reference = subprocess.Popen(_command(whole, "data,proposals"), cwd=PROJECT_ROOT, env=_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    process = subprocess.Popen(_command(killed, "data,proposals"), cwd=PROJECT_ROOT, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list((killed / "artifacts" / "proposals").glob("*/rpn_checkpoints/last.pt")):
            assert process.poll() is None, "the run ended before it wrote an RPN checkpoint"
            assert time.monotonic() < deadline, "no RPN checkpoint within 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    out = _rpn_dir(killed)
    assert not (out / "rpn.pt").exists() and not (out / "manifest.json").exists()
    stopped_at = torch.load(out / "rpn_checkpoints" / "last.pt", weights_only=True)["iteration"]
    assert 0 < stopped_at < ITERATIONS

    _run(killed, "data,proposals")
    stdout, stderr = reference.communicate(timeout=600)
    assert reference.returncode == 0, stdout[-3000:] + stderr[-3000:]
    resumed = torch.load(out / "rpn.pt", weights_only=True)["state_dict"]
    uninterrupted = torch.load(_rpn_dir(whole) / "rpn.pt", weights_only=True)["state_dict"]
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
