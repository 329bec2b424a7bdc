"""What a per-image task sees on a cluster with logical GPUs (ray.init(num_gpus=...)
declares them without hardware): run by the tests in tests/pipeline/test_gpu_placement.py
as the function of a map, in the Ray worker.

`placement(train_dir)` loads "the detector" through the detect stage's own
per-worker loader (stages/detect.py `_detector`) with the file reading replaced
by a record of the device the model would be moved to, and reports the task's
environment, the resources Ray gave it and whether this call loaded the model.
"""
from __future__ import annotations

import os

import ray
import torch

import stages.detect

_LOADS: list[str] = []  # devices this process loaded the detector to


def _record_load(train_dir, *, device):
    _LOADS.append(str(device))
    return object(), None


def placement(train_dir: str) -> dict:
    # The logical GPUs have no hardware behind them: say CUDA works, so that only
    # the placement (CUDA_VISIBLE_DEVICES from Ray, or hidden) decides the device.
    torch.cuda.is_available = lambda: True
    stages.detect.load_trained_detector = _record_load
    before = len(_LOADS)
    stages.detect._detector(train_dir)
    context = ray.get_runtime_context()
    return {"pid": os.getpid(), "loaded": len(_LOADS) - before, "device": _LOADS[-1],
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpu_ids": [str(i) for i in context.get_accelerator_ids().get("GPU", [])],
            "gpus_held": context.get_assigned_resources().get("GPU", 0.0)}


def fail_on_three(item: int) -> int:
    if item == 3:
        raise ValueError(f"bad item {item}")
    return item
