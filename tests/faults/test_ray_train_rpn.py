"""RPN training (the proposals stage) with two Ray Train workers: SIGTERM to the
driver once rank 0 reports an iteration, far from any periodic checkpoint
(every 1000): exit 143; the rerun says it resumed at the iteration the workers
stopped at and ends with rpn.pt bitwise equal to an uninterrupted two-worker
run's. The data stage is the session's smoke output; the uninterrupted run goes
on beside the interrupted one."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.config import PROJECT_ROOT
from tests.faults.conftest import RUN_TIMEOUT_S, assert_ok, pipeline_env
from tests.helpers import copy_artifact

ITERATIONS = 12
# Two workers need at least two images per update (each takes the same share).
OVERRIDES = ["-o", "runtime.train_workers=2", "-o", "runtime.num_workers=2", "-o", "proposals.rpn.images_per_batch=2",
             "-o", f"proposals.rpn.iterations={ITERATIONS}", "-o", "proposals.rpn.checkpoint_every=1000"]
POLL_S = 0.05


def start(workdir: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "pipeline", "run", "--config", "smoke", "--workdir", str(workdir),
            "--stages", "data,proposals", *OVERRIDES]
    return subprocess.Popen(args, cwd=PROJECT_ROOT, env=pipeline_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def rpn_done(workdir: Path) -> int:
    """RPN iterations done, as rank 0 last reported them (0 before the first report)."""
    found = list((workdir / "artifacts" / "proposals").glob("*/rpn_ray/rpn.progress.json"))
    try:
        return int(json.loads(found[0].read_text(encoding="utf-8"))["done"]) if found else 0
    except (OSError, ValueError):
        return 0


def rpn_output(workdir: Path) -> Path:
    [out] = [p for p in (workdir / "artifacts" / "proposals").iterdir() if p.is_dir()]
    return out


def test_sigterm_during_rpn_training_with_two_workers(smoke_run, mlflow_db_template, tmp_path):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    for workdir in (whole, stopped):
        copy_artifact(smoke_run.dirs["data"], workdir / "artifacts" / "data")  # a cache hit
        shutil.copy(mlflow_db_template, workdir / "mlflow.db")
    began = time.monotonic()
    reference = start(whole)
    proc = start(stopped)
    while rpn_done(stopped) < 3:
        assert proc.poll() is None, finish(proc).stderr[-3000:]
        time.sleep(POLL_S)
    proc.send_signal(signal.SIGTERM)
    first = finish(proc)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
    assert "Traceback" not in first.stderr, first.stderr[-3000:]
    marker = "interrupted (training stopped after iteration "
    assert marker in first.stderr, first.stderr[-3000:]
    iteration = int(first.stderr.split(marker, 1)[1].split(";", 1)[0])
    assert 3 <= iteration < ITERATIONS
    out = rpn_output(stopped)
    assert not (out / "rpn.pt").exists() and not (out / "manifest.json").exists()
    assert torch.load(out / "rpn_checkpoints" / "last.pt", weights_only=True)["iteration"] == iteration

    rerun = finish(start(stopped))
    assert_ok(rerun)
    assert f"rpn training: resumed at iteration {iteration} of {ITERATIONS}" in rerun.stdout, rerun.stdout[-3000:]
    done = finish(reference)
    assert_ok(done)
    resumed = torch.load(out / "rpn.pt", weights_only=True)["state_dict"]
    uninterrupted = torch.load(rpn_output(whole) / "rpn.pt", weights_only=True)["state_dict"]
    assert resumed.keys() == uninterrupted.keys()
    different = [k for k in uninterrupted if not torch.equal(resumed[k], uninterrupted[k])]
    assert different == [], different
    print(f"RPN, two workers: SIGTERM at iteration {iteration} and rerun: {time.monotonic() - began:.0f} s")
