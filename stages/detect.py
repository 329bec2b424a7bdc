"""The detect stage: the trained detector run once over minival and test with
the test proposal mix, keeping every candidate any NMS / voting threshold could
use (score >= detect.score_thresh; at most detect.max_candidates per image, the
best), so tune and evaluate never run the network.

    <out>/parts/<set>_<split>/       finished shards of images (a killed run resumes; deleted
                                     once the split's stores below are written)
    <out>/raw_<split>_plain.h5       candidates of the unflipped image (stages/helpers/raw_detections.py)
    <out>/raw_<split>_round1.h5      the unflipped round-1 candidates alone (evaluate's baseline:
                                     one round of box regression, Appendix item 5)
    <out>/raw_<split>_flip.h5        flip-merged candidates (detect.flip)

Images go to Ray tasks in shards of `detect.images_per_task`; each task loads
the detector once per worker process (on a GPU when the cluster has one and
runtime.device allows it: one worker per GPU, pipeline/cluster/tasks.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ion.data.images import load_image
from ion.data.split import DetectionSplit
from ion.inference.predict import predict_raw
from proposals.store import ProposalStore, Shard, ShardedWriter, remove_parts, write_shard
from stages.contract import StageContext, StageResult
from stages.helpers.raw_detections import ROUND1, as_item, round_one, top_candidates, write_raw
from stages.helpers.worker_cache import cached, worker_device
from stages.train import load_trained_detector

NAME = "detect"
VERSION = "2"
READS = ("detect",)
UPSTREAM = ("data", "proposals", "train")


@dataclass(frozen=True)
class DetectTask:
    """One Ray task: the raw candidates of one shard of one split's images."""

    split: str
    shard: Shard
    images: tuple[tuple[int, str, int, int], ...]  # (image_id, path, width, height)
    proposals: str  # the split's mixed proposal store
    train_dir: str
    parts_dirs: dict  # candidate set -> directory its shard file goes to
    flip: bool
    score_thresh: float
    two_rounds: bool
    round2: str
    amp: str  # detect.amp, applied only where the detector runs on a GPU
    max_candidates: int | None  # per image and set


def run(cfg, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    dcfg = cfg.detect
    sets = ("plain", ROUND1, "flip") if dcfg.flip else ("plain", ROUND1)
    metrics, summary = {}, []
    for split_name in dcfg.splits:
        split = DetectionSplit.load(inputs["data"], split_name, with_annotations=False)
        records = split.images[: dcfg.max_images] if dcfg.max_images else split.images
        ids = [r.image_id for r in records]
        paths = {s: out / f"raw_{split_name}_{s}.h5" for s in sets}
        missing = [s for s in sets if not paths[s].exists()]  # a written store means its set is done
        tasks, seconds = [], 0.0
        if missing:
            writers = {s: ShardedWriter(out / "parts" / f"{s}_{split_name}", ids,
                                        images_per_shard=dcfg.images_per_task) for s in sets}
            by_id = {r.image_id: r for r in records}
            # A task writes every set's shard; it is needed while a set without a store lacks it.
            pending = [shard for shard in writers["plain"].shards
                       if any(not writers[s].is_done(shard) for s in missing)]
            tasks = [DetectTask(split=split_name, shard=shard,
                                images=tuple((i, str(by_id[i].path), by_id[i].width, by_id[i].height)
                                             for i in shard.image_ids),
                                proposals=str(inputs["proposals"] / f"mixed_{split_name}.h5"),
                                train_dir=str(inputs["train"]),
                                parts_dirs={s: str(w.directory) for s, w in writers.items()},
                                flip=dcfg.flip, score_thresh=dcfg.score_thresh, two_rounds=dcfg.two_rounds,
                                round2=dcfg.round2, amp=dcfg.amp, max_candidates=dcfg.max_candidates)
                     for shard in pending]
            if tasks:
                started = time.perf_counter()
                ctx.map(detect_shard, tasks, desc=f"detect {split_name}", gpu=True)
                seconds = time.perf_counter() - started
            for name in missing:
                # Shards stream from disk into the store: a split's candidates never sit in memory.
                write_raw(paths[name], writers[name].iter_items(), categories=split.categories,
                          attrs={"split": split_name, "set": name, "score_thresh": dcfg.score_thresh})
            # Only once every set's store is written: the shards duplicate them.
            remove_parts([w.directory for w in writers.values()])
        with ProposalStore(paths["plain"]) as store:
            candidates = int(store.attrs["num_boxes"])
        computed = sum(len(t.images) for t in tasks)
        if computed:
            metrics[f"{split_name}_images_per_s"] = computed / seconds
        metrics[f"{split_name}_candidates_per_image"] = candidates / max(1, len(ids))
        cap = f", at most {dcfg.max_candidates}" if dcfg.max_candidates else ""
        summary.append(f"{split_name}: {len(ids)} images, {candidates / max(1, len(ids)):.0f} candidates per image "
                       f"(score >= {dcfg.score_thresh}{cap})"
                       + (f", {computed / seconds:.1f} images/s" if computed else ", all shards cached"))
    return StageResult(metrics=metrics, summary=summary)


def _detector(train_dir: str):
    """The trained detector and its ModelConfig, loaded once per worker process."""
    return cached("detector", train_dir, lambda: load_trained_detector(Path(train_dir), device=worker_device()))


def detect_shard(task: DetectTask) -> int:
    """A Ray task: raw candidates of one shard, saved per candidate set; returns the image count."""
    if worker_device().type == "cpu":
        torch.set_num_threads(1)  # one task per core: Ray's tasks are the parallelism
    model, model_cfg = _detector(task.train_dir)
    amp = task.amp if next(model.parameters()).device.type == "cuda" else "off"
    per_set: dict[str, list] = {s: [] for s in task.parts_dirs}
    with ProposalStore(task.proposals) as store:
        for image_id, path, width, height in task.images:
            image = load_image(Path(path), expected_size=(width, height))
            boxes, _ = store.get(image_id)
            raw = predict_raw(model, image, boxes, min_size=model_cfg.input.min_size,
                              max_size=model_cfg.input.max_size, flip=task.flip,
                              score_thresh=task.score_thresh, two_rounds=task.two_rounds, round2=task.round2,
                              amp=amp)
            raw[ROUND1] = round_one(raw["plain"])
            for name in per_set:
                per_set[name].append(as_item(image_id, top_candidates(raw[name], task.max_candidates)))
    for name, items in per_set.items():
        write_shard(task.parts_dirs[name], task.shard, items)
    return len(task.images)
