"""bench/gpu_check.py --tiny: the GPU session's engine check end to end on the
CPU (where every run must agree bitwise, a killed and resumed one included),
importing nothing the GPU machine lacks, with configs/smoke.yaml's model."""
from __future__ import annotations

import dataclasses

from bench.gpu_check import smoke_model
from pipeline.config import PROJECT_ROOT, load_config
from tests.helpers import run_gpu_bench

ABSENT_ON_THE_GPU_MACHINE = ("ray", "mlflow", "optuna", "pycocotools", "cv2", "yaml")


def test_the_checked_model_is_the_smoke_configs():
    loaded = load_config(PROJECT_ROOT / "configs" / "smoke.yaml").model
    assert smoke_model() == dataclasses.replace(loaded, imagenet_weights=None)


def test_tiny_run_agrees_bitwise_on_the_cpu_after_a_kill_and_imports_only_torch_and_ion():
    done = run_gpu_bench("bench.gpu_check", ABSENT_ON_THE_GPU_MACHINE, "--tiny", timeout=600)
    lines = dict(line.rsplit(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    resumed = "cpu killed after update 3, resumed from update 2: weights bitwise equal to an uninterrupted run"
    assert lines[resumed].startswith("True (max |difference| 0.00e+00)"), done.stdout
    losses = lines["losses, CPU fp32"].split("  (")[0].split()
    assert len(losses) == 5 and all(float(v) > 0 for v in losses)
