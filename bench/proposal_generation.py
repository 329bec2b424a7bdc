"""Proposal generation throughput: images/s of each proposal source as the
proposals stage runs it (stages.proposals.compute_shard as Ray tasks through
pipeline.cluster.tasks), with 1 and then 2 Ray workers, and the scaling ratio.

    .venv/bin/python -m bench.proposal_generation [--images 64] [--images-per-task 4] [--rounds 2] [--repeats 1]

Images: synthetic context-shapes scenes (ion.data.synthetic, default sizes
192-256 px) written as JPEG, read back by the tasks as in the stage. Sources:
the RPN group (RPN1 and RPN2 from one backbone pass, configs/default.yaml's
proposals.rpn with untrained weights: the cost does not depend on the weights)
and selective search (configs/default.yaml's settings). Each Ray instance is
warmed up first (worker processes started, torch imported, the RPN loaded in
every worker), so the figures are steady-state throughput. The machine is
shared: each round measures 1 and then 2 workers, `--repeats` runs each, and
each figure is the best over all rounds (the run least disturbed), so a burst
of load elsewhere does not land on one side only. The ratio is 2-worker over
1-worker throughput (2.0 = linear).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ion.data import synthetic
from ion.data.config import SyntheticConfig
from pipeline.cluster.tasks import init_ray, ray_map, shutdown_ray
from pipeline.config import PROJECT_ROOT, load_config
from proposals.rpn.model import build_rpn, save_rpn
from proposals.store import Shard
from stages.contract import RuntimeConfig
from stages.proposals import GROUP_SOURCES, ShardTask, compute_shard

GROUPS = ("rpn", "selective_search")
WORKER_COUNTS = (1, 2)
FIRST_IMAGE_ID = 1


def write_images(directory: Path, count: int, *, seed: int) -> list[tuple[int, str, int, int]]:
    """`count` synthetic test-split images as JPEG files: [(image_id, path, width, height)]."""
    syn = SyntheticConfig()
    directory.mkdir(parents=True)
    images = []
    for index in range(count):
        image_id = FIRST_IMAGE_ID + index
        generated = synthetic.generate_image(
            seed=seed, split="test", index=index, image_id=image_id, min_side=syn.min_side,
            max_side=syn.max_side, band_height=syn.band_height, cue_gap=syn.cue_gap,
            max_overlap=syn.max_overlap, crowd_probability=syn.crowd_probability, jpeg_quality=syn.jpeg_quality)
        path = directory / f"{image_id:07d}.jpg"
        path.write_bytes(generated.jpeg)
        images.append((image_id, str(path), generated.image["width"], generated.image["height"]))
    return images


def group_settings(cfg, weights: Path) -> dict[str, dict]:
    """The per-group task settings, as stages/proposals.py builds them."""
    ss = cfg.proposals.selective_search
    return {"rpn": {"weights": str(weights), "cfg": cfg.proposals.rpn},
            "selective_search": dict(mode=ss.mode, k=ss.k, k_step=ss.k_step, sigma=ss.sigma,
                                     min_size=ss.min_size, max_boxes=ss.max_boxes, resize_max=ss.resize_max)}


def shard_tasks(group: str, images: list, settings: dict, parts: Path, images_per_task: int) -> list[ShardTask]:
    """One task per `images_per_task` images, writing its shard files under `parts`."""
    parts_dirs = {}
    for source in GROUP_SOURCES[group]:
        parts_dirs[source] = str(parts / source)
        (parts / source).mkdir(parents=True)
    tasks = []
    for n, start in enumerate(range(0, len(images), images_per_task)):
        chunk = tuple(images[start:start + images_per_task])
        tasks.append(ShardTask(group=group, split="bench", shard=Shard(index=n, image_ids=tuple(i[0] for i in chunk)),
                               images=chunk, parts_dirs=parts_dirs, settings=settings))
    return tasks


def measure(workers: int, images: list, settings: dict, work: Path, *, images_per_task: int,
            repeats: int) -> dict[str, float]:
    """images/s of each group (best of `repeats`) on a fresh local Ray instance with `workers` CPUs."""
    init_ray(RuntimeConfig(num_workers=workers, workdir=str(work)))
    try:
        # Warm-up: 2 one-image tasks per worker and group start the workers and load the RPN in each.
        for group in GROUPS:
            warm = shard_tasks(group, images[: 2 * workers], settings[group], work / f"warm-{workers}-{group}", 1)
            ray_map(compute_shard, warm, desc=f"warm-up {group}")
        rates = {}
        for group in GROUPS:
            best = float("inf")
            for repeat in range(repeats):
                tasks = shard_tasks(group, images, settings[group], work / f"run-{workers}-{group}-{repeat}",
                                    images_per_task)
                start = time.perf_counter()
                counts = ray_map(compute_shard, tasks, desc=f"{group} x{workers}")
                best = min(best, time.perf_counter() - start)
                assert sum(counts) == len(images), "every image computed once"
            rates[group] = len(images) / best
        return rates
    finally:
        shutdown_ray()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--images-per-task", type=int, default=4,
                        help="images per Ray task (the stage uses 32 on full-size splits)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (1 worker, 2 workers)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per Ray instance and source")
    args = parser.parse_args()

    cfg = load_config(PROJECT_ROOT / "configs" / "default.yaml")
    work = Path(tempfile.mkdtemp(prefix="bench_proposal_generation_"))
    try:
        images = write_images(work / "images", args.images, seed=cfg.seed)
        torch.manual_seed(0)
        weights = work / "rpn.pt"
        save_rpn(build_rpn(cfg.proposals.rpn), weights, cfg.proposals.rpn)
        settings = group_settings(cfg, weights)
        rates = {workers: {group: 0.0 for group in GROUPS} for workers in WORKER_COUNTS}
        for round_index in range(args.rounds):
            for workers in WORKER_COUNTS:
                measured = measure(workers, images, settings, work / f"round-{round_index}",
                                   images_per_task=args.images_per_task, repeats=args.repeats)
                rates[workers] = {g: max(rates[workers][g], measured[g]) for g in GROUPS}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    sides = sorted({max(w, h) for _, _, w, h in images})
    print(f"{args.images} synthetic images ({sides[0]}-{sides[-1]} px longer side), {args.images_per_task} per "
          f"Ray task, best of {args.rounds} rounds x {args.repeats} runs; configs/default.yaml proposals settings")
    print(f"{'source':<28} {'1 worker img/s':>15} {'2 workers img/s':>16} {'ratio':>6}")
    names = {"rpn": "rpn (rpn1 + rpn2, one pass)", "selective_search": "selective_search"}
    for group in GROUPS:
        one, two = rates[1][group], rates[2][group]
        print(f"{names[group]:<28} {one:>15.1f} {two:>16.1f} {two / one:>6.2f}")


if __name__ == "__main__":
    main()
