"""Does the cluster hold what the config asks for? Checked before any stage starts: a
training job that asks for more GPUs than exist would otherwise wait a minute inside Ray
Train and fail with its generic "insufficient resources" error, after the stages before it ran."""
from __future__ import annotations

import os
from typing import Any

TRAIN_STAGE = "train"


def resource_problems(runtime: Any, *, gpus: float, where: str) -> list[str]:
    """One line per way `runtime` cannot run on a cluster with `gpus` GPUs (`where` names it)."""
    count = int(gpus)
    if runtime.device == "cuda" and count == 0:
        return [f"runtime.device: cuda, but {where} has no GPU; set runtime.device: auto (or cpu), or join a "
                f"cluster with GPUs (runtime.ray_address)"]
    if runtime.device != "cpu" and count >= 1 and runtime.train_workers > count:
        return [f"runtime.train_workers: {runtime.train_workers} training workers take one GPU each, but "
                f"{where} has {count} GPU{'s' if count != 1 else ''}; set -o runtime.train_workers={count} "
                f"(the minibatch is train.images_per_batch per worker) or add GPUs"]
    return []


def check_resources(runtime: Any, *, trains: bool) -> list[str]:
    """The problems above for the cluster this run would use (none when the train stage will not
    run); a cluster named by runtime.ray_address or RAY_ADDRESS is joined, so an unreachable one
    is a UserError naming it."""
    if not trains and not (getattr(runtime, "ray_address", None) or os.environ.get("RAY_ADDRESS")):
        return []
    from pipeline.cluster.tasks import visible_gpus

    gpus, where = visible_gpus(runtime)
    return resource_problems(runtime, gpus=gpus, where=where) if trains else []
