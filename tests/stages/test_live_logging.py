"""Training is watchable while it runs: with 2 Ray Train workers, the train
stage's MLflow run gets its loss points during training (rank 0 logs them),
not after, and a piped stdout shows done/total progress lines before the
stage's end line; the run's log file holds what it printed.

"During training" is checked by causality rather than by the clock: the first
loss point is older than the checkpoint rank 0 wrote at the end of phase 0.
(Whether it also falls in the first half of the stage's run time depends on
how long Ray Train takes to start against how long training takes: on the
shared 2-core test machine the start-up alone took over two minutes.)"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from pipeline.config import PROJECT_ROOT
from tests.helpers import copy_artifact

ITERATIONS = (20, 10)


def test_two_workers_log_losses_while_training_and_print_progress(smoke_run, tmp_path, workdir):
    # The smoke run's data and proposals: cache hits here (the overrides below change
    # only runtime and train), so the run spends its time on Ray Train.
    for stage in ("data", "proposals"):
        copy_artifact(smoke_run.dirs[stage], workdir / "artifacts" / stage)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")])
    env["ION_PROGRESS_EVERY"] = "0"  # every update: the test does not depend on timing
    stdout = tmp_path / "stdout.txt"
    with open(stdout, "w") as piped:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", "--config", "smoke", "--stages", "data,proposals,train",
             "--workdir", str(workdir), "-o", "runtime.train_workers=2", "-o", "runtime.num_workers=2",
             "-o", f"train.phases[0].iterations={ITERATIONS[0]}", "-o", f"train.phases[1].iterations={ITERATIONS[1]}",
             "-o", "train.checkpoint_every=10"],
            cwd=PROJECT_ROOT, env=env, stdout=piped, stderr=subprocess.STDOUT, timeout=900)
    text = stdout.read_text()
    assert done.returncode == 0, text[-4000:]

    lines = text.splitlines()
    assert re.search(r"^data +cached", text, re.MULTILINE) and re.search(r"^proposals +cached", text, re.MULTILINE)
    start = lines.index(next(line for line in lines if line.startswith("stage train: started")))
    end = lines.index(next(line for line in lines if line.startswith("stage train: finished")))
    total = sum(ITERATIONS)
    progress = [line for line in lines[start:end] if re.match(rf"train: \d+/{total} \(\d+%\) [\d.]+ it/s", line)]
    assert progress and f"train: {total}/{total}" in progress[-1], lines[start:end]
    log_file = re.search(r"^log: +(\S+)$", text, re.MULTILINE).group(1)
    assert "stage train: finished" in Path(log_file).read_text(encoding="utf-8")

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "smoke"]
    [run] = client.search_runs([experiment.experiment_id], "tags.stage = 'train'")
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, total + 1))  # log_every 1, each step once
    [phase0_end] = (workdir / "artifacts" / "train").glob("*/ray/train/phase0_first/checkpoint.pt")
    first_logged_ms = min(m.timestamp for m in history)
    assert first_logged_ms < phase0_end.stat().st_mtime * 1000
    assert run.info.start_time <= first_logged_ms <= run.info.end_time
