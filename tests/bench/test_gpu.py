"""bench/gpu.py --tiny: the GPU benchmark's code end to end on a small CPU
model, importing nothing a bare torch + torchvision machine lacks."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from pipeline.config import PROJECT_ROOT

ABSENT_ON_THE_GPU_MACHINE = ("ray", "mlflow", "optuna", "pycocotools", "cv2", "h5py", "yaml")


def test_tiny_run_prints_training_and_inference_rows_and_imports_only_torch_and_ion():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    check = ("import sys, bench.gpu; "
             f"print(sorted(m for m in {ABSENT_ON_THE_GPU_MACHINE!r} if m in sys.modules))")
    imported = subprocess.run([sys.executable, "-c", check], cwd=PROJECT_ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
    assert imported.returncode == 0 and imported.stdout.strip() == "[]", imported.stdout + imported.stderr

    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--tiny"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {m.group(1).strip(): (float(m.group(2)), m.group(3))
            for m in re.finditer(r"^(.+?)\s+([\d.]+)  (images/s|ms)$", done.stdout, re.MULTILINE)}
    names = list(rows)
    assert any(n.startswith("training") and rows[n][1] == "images/s" and rows[n][0] > 0 for n in names), rows
    assert any(n.startswith("inference single pass") and rows[n][1] == "images/s" for n in names), rows
    assert any(n.startswith("inference flip + 2 rounds") and rows[n][1] == "images/s" for n in names), rows
    assert {"IRNN scan closed_form (fwd+bwd)", "IRNN scan loop (fwd+bwd)"} <= set(names)
    assert any(n.startswith("roi_pool") for n in names) and any(n.startswith("roi_align") for n in names)
