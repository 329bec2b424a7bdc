"""bench/gpu.py --tiny: the GPU benchmark's code end to end on a small CPU
model, importing nothing a bare torch + torchvision machine lacks."""
from __future__ import annotations

import re

from ion.inference.predict import SCORE_THRESH
from stages.config import DetectConfig
from tests.helpers import run_gpu_bench

ABSENT_ON_THE_GPU_MACHINE = ("ray", "mlflow", "optuna", "pycocotools", "cv2", "h5py", "yaml")


def test_tiny_run_prints_training_and_inference_rows_and_imports_only_torch_and_ion():
    done = run_gpu_bench("bench.gpu", ABSENT_ON_THE_GPU_MACHINE, "--tiny", timeout=300)
    rows = {m.group(1).strip(): (float(m.group(2)), m.group(3))
            for m in re.finditer(r"^(.+?)\s+([\d.]+)  (images/s|ms)$", done.stdout, re.MULTILINE)}
    names = list(rows)
    assert "on CPU (cpu)" in done.stdout.splitlines()[0]  # the device's name
    # The recipe coco_base trains: the segmentation loss on.
    assert any(n.startswith("training (off, 4 images/update, seg loss 1)") and rows[n][1] == "images/s"
               and rows[n][0] > 0 for n in names), rows
    # Inference at the detect stage's threshold, keeping the tiny target's 100 candidates per pass.
    for kind in ("inference single pass", "inference flip + 2 rounds"):
        assert any(n.startswith(f"{kind} (off, score >= 0.05: 100 candidates/pass)") and rows[n][1] == "images/s"
                   for n in names), rows
    assert {"IRNN scan closed_form (fwd+bwd)", "IRNN scan loop (fwd+bwd)"} <= set(names)
    assert any(n.startswith("roi_pool") for n in names) and any(n.startswith("roi_align") for n in names)


def test_inference_is_measured_at_the_detect_stages_threshold():
    assert SCORE_THRESH == DetectConfig().score_thresh == 0.05
