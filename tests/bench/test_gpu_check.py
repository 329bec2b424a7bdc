"""bench/gpu_check.py --tiny: the GPU session's engine check end to end on the
CPU (where every run must agree bitwise, a killed and resumed one included),
importing nothing the GPU machine lacks, with configs/smoke.yaml's model."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

from bench.gpu_check import smoke_model
from pipeline.config import PROJECT_ROOT, load_config

ABSENT_ON_THE_GPU_MACHINE = ("ray", "mlflow", "optuna", "pycocotools", "cv2", "yaml")


def test_the_checked_model_is_the_smoke_configs():
    loaded = load_config(PROJECT_ROOT / "configs" / "smoke.yaml").model
    assert smoke_model() == dataclasses.replace(loaded, imagenet_weights=None)


def test_tiny_run_agrees_bitwise_on_the_cpu_after_a_kill_and_imports_only_torch_and_ion():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    check = ("import sys, bench.gpu_check; "
             f"print(sorted(m for m in {ABSENT_ON_THE_GPU_MACHINE!r} if m in sys.modules))")
    imported = subprocess.run([sys.executable, "-c", check], cwd=PROJECT_ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
    assert imported.returncode == 0 and imported.stdout.strip() == "[]", imported.stdout + imported.stderr

    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--tiny"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.rsplit(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    resumed = "cpu killed after update 3, resumed from update 2: weights bitwise equal to an uninterrupted run"
    assert lines[resumed].startswith("True (max |difference| 0.00e+00)"), done.stdout
    losses = lines["losses, CPU fp32"].split("  (")[0].split()
    assert len(losses) == 5 and all(float(v) > 0 for v in losses)
