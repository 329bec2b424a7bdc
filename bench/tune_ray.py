"""Tune-trial throughput as the tune stage runs it: `stages.tune.trial_ap` as Ray
tasks through pipeline/cluster/tasks.py, with 1 and then 2 Ray workers, side by side.

    .venv/bin/python -m bench.tune_ray [--images 1000] [--trials 8]

The raw candidates and ground truth come from bench/tune_trial.py's synthetic
minival, written in the detect stage's format (stages/helpers/raw_detections.py), so
each worker loads them once, as in a real study. Rounds alternate 1 and 2
workers and keep the best figure of each, so load from other processes on a
shared machine skews both alike.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.tune_trial import TRIALS, make_minival
from ion.data.categories import CategoryMap
from pipeline.cluster.tasks import init_ray, ray_map, shutdown_ray
from stages.contract import RuntimeConfig
from stages.helpers.raw_detections import write_raw
from stages.tune import trial_ap


def _write_inputs(directory: Path, images: int) -> dict:
    gt, raw = make_minival(num_images=images, seed=0)
    gt_path = directory / "minival.json"
    gt_path.write_text(json.dumps(gt), encoding="utf-8")
    raw_path = directory / "raw_minival_flip.h5"
    items = [(i, d.boxes, d.scores, d.labels.astype("int8")) for i, d in raw.items()]
    write_raw(raw_path, items, categories=CategoryMap.from_coco(gt["categories"]), attrs={"split": "minival"})
    return {"raw": str(raw_path), "gt": str(gt_path)}


def _tasks(inputs: dict, trials: int) -> list[dict]:
    params = [TRIALS[i % len(TRIALS)] for i in range(trials)]
    return [{**inputs, "params": {"nms_iou": p.nms_iou, "vote_iou": p.vote_iou}} for p in params]


def _trials_per_minute(workers: int, inputs: dict, trials: int, workdir: Path) -> float:
    init_ray(replace(RuntimeConfig(), workdir=str(workdir), num_workers=workers, device="cpu"))
    try:
        ray_map(trial_ap, _tasks(inputs, workers), desc="warm-up")  # each worker loads the candidates once
        start = time.perf_counter()
        ray_map(trial_ap, _tasks(inputs, trials), desc=f"{workers} worker(s)")
        return 60 * trials / (time.perf_counter() - start)
    finally:
        shutdown_ray()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=8, help="trials per measurement (a multiple of 2)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = _write_inputs(Path(tmp), args.images)
        best = {1: 0.0, 2: 0.0}
        for _ in range(args.rounds):
            for workers in (1, 2):
                best[workers] = max(best[workers], _trials_per_minute(workers, inputs, args.trials, Path(tmp)))
    print(f"tune trials as Ray tasks, {args.images} images, best of {args.rounds} rounds")
    print(f"{'workers':>8} {'trials/min':>11} {'vs 1':>6}")
    for workers in (1, 2):
        print(f"{workers:>8} {best[workers]:>11.1f} {best[workers] / best[1]:>5.2f}x")


if __name__ == "__main__":
    main()
