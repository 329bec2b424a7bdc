"""One value per worker process, rebuilt only when its key changes.

Ray reuses worker processes across tasks: a trained model, or a split's
candidates and ground truth, is loaded by the first task a worker runs and
kept for the next ones with the same key, instead of once per task. Only the
latest key is kept, so a worker never holds two models at once.

`worker_device` is where a worker puts its model: the GPU Ray gave it, if any.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Hashable, TypeVar

import torch

T = TypeVar("T")

_SLOTS: dict[str, tuple[Hashable, Any]] = {}


def cached(slot: str, key: Hashable, build: Callable[[], T]) -> T:
    """`build()`'s value for `key`, built once per process; a new key in the same
    `slot` drops the old value first (to free its memory before building)."""
    held = _SLOTS.get(slot)
    if held is not None and held[0] == key:
        return held[1]
    _SLOTS.pop(slot, None)
    value = build()
    _SLOTS[slot] = (key, value)
    return value


def worker_device() -> torch.device:
    """cuda when this process may use a GPU, else cpu.

    A Ray task or actor holding a GPU sees only that GPU (CUDA_VISIBLE_DEVICES set
    by Ray); one holding none sees CUDA_VISIBLE_DEVICES="" (pipeline/cluster/tasks.py),
    which is checked first so that such a worker never initialises CUDA.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
