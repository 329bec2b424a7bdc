"""The proposals stage: train the 22-anchor RPN, compute every proposal source
for every split, mix them, and report recall (Appendix item 2).

    <out>/rpn.pt                          RPN1 + RPN2 heads on one backbone (proposals/rpn/)
    <out>/rpn_checkpoints/                RPN training checkpoints: a rerun resumes (stages/helpers/rpn_training.py)
    <out>/parts/<source>_<split>/         finished shards of per-image work (resume; deleted
                                          once the group's stores for the split are written)
    <out>/sources/<source>_<split>.h5     one proposal store per source and split
    <out>/mixed_<split>.h5                the train mix for train, the test mix for minival/test
    <out>/recall.json                     AR and recall@0.5/0.7 per split, source and object size
    <out>/plots/recall_<split>.png        AR vs number of proposals, one line per source

Per-image work runs as Ray tasks over shards of images; each finished shard is
saved at once, so a killed run recomputes only the missing shards.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ion.atomic import write_json_atomic
from ion.data.images import load_image
from ion.data.split import INDEX_FILE, DetectionSplit
from proposals.mcg import load_mcg_proposals, locate_mcg_files
from proposals.mix import mix_stores
from proposals.recall import curve_counts, load_ground_truth, plot_recall, store_recall
from proposals.rpn.config import RpnConfig
from proposals.rpn.generate import generate_proposals_all
from proposals.rpn.model import VARIANTS, load_rpn
from proposals.selective_search import selective_search_isolated
from proposals.store import ProposalStore, Shard, ShardedWriter, remove_parts, write_shard, write_store
from stages.contract import StageContext, StageResult
from stages.helpers.rpn_training import train_rpn_stage
from stages.helpers.worker_cache import cached, worker_device

NAME = "proposals"
VERSION = "1"
READS = ("seed", "proposals")
UPSTREAM = ("data",)

IMAGES_PER_SHARD = 32
# Source groups computed by one task: RPN1 and RPN2 share one backbone pass.
GROUP_SOURCES = {"rpn": VARIANTS, "mcg": ("mcg",), "selective_search": ("selective_search",)}


@dataclass(frozen=True)
class ShardTask:
    """One Ray task: the proposals of one source group for one shard of one split."""

    group: str
    split: str
    shard: Shard
    images: tuple[tuple[int, str, int, int], ...]  # (image_id, path, width, height)
    parts_dirs: dict  # source -> directory its shard file goes to
    settings: dict  # per-group parameters (rpn weights path + config, selective search, mcg)


def run(cfg, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    pcfg = cfg.proposals
    splits = _load_splits(inputs["data"])
    mixes = {name: pcfg.resolve_mix("train" if name == "train" else "test") for name in splits}
    needed = set().union(*(set(m) for m in mixes.values())) | set(pcfg.bottom_up_sources())
    groups = [g for g, sources in GROUP_SOURCES.items() if needed & set(sources)]
    metrics: dict[str, float] = {}
    summary: list[str] = []

    settings: dict[str, dict] = {}
    if "rpn" in groups:
        rpn_path = out / "rpn.pt"
        if not rpn_path.exists():
            started = time.perf_counter()
            metrics.update(train_rpn_stage(pcfg.rpn, data_dir=Path(inputs["data"]), path=rpn_path, out=out,
                                           seed=cfg.seed, ctx=ctx))
            # Timed on its own: it grows with the RPN's iterations, not the images (`pipeline plan`).
            metrics["rpn_train_s"] = time.perf_counter() - started
            if metrics["rpn_started_at"]:
                summary.append(f"proposals: RPN trained {int(metrics['rpn_iterations'])} iterations, resumed at "
                               f"iteration {int(metrics['rpn_started_at'])}")
        settings["rpn"] = {"weights": str(rpn_path), "cfg": pcfg.rpn}
    if "selective_search" in groups:
        ss = pcfg.selective_search
        settings["selective_search"] = dict(mode=ss.mode, k=ss.k, k_step=ss.k_step, sigma=ss.sigma,
                                            min_size=ss.min_size, max_boxes=ss.max_boxes,
                                            resize_max=ss.resize_max)
    stores: dict[str, dict[str, Path]] = {name: {} for name in splits}
    for group in groups:
        for split_name, split in splits.items():
            if group == "mcg":
                settings["mcg"] = _mcg_settings(pcfg.mcg, split)
                without = settings["mcg"]["missing"]
                if without:  # only with allow_missing: otherwise locating the files raised
                    metrics[f"{split_name}_images_without_mcg"] = float(without)
                    summary.append(f"{split_name}: {without} of {len(split.images)} images have no MCG file "
                                   f"in {pcfg.mcg.dir} (proposals.mcg.allow_missing): no MCG boxes for them")
            paths = _compute_group(group, split, settings[group], out, ctx, config_key=out.name)
            stores[split_name].update(paths)

    for split_name, mix in mixes.items():
        path = out / f"mixed_{split_name}.h5"
        if not path.exists():
            opened = {source: ProposalStore(stores[split_name][source]) for source in mix}
            try:
                items = mix_stores(opened, mix, [r.image_id for r in splits[split_name].images],
                                   dedup_iou=pcfg.mix.dedup_iou)
                write_store(path, items, {"source": "mix", "split": split_name, "config_key": out.name,
                                          "source_names": list(mix), "top_k": dict(mix)})
            finally:
                for store in opened.values():
                    store.close()
        stores[split_name]["mix"] = path

    recall = _recall_report(splits, stores, pcfg.recall.counts, out, ctx)
    write_json_atomic(out / "recall.json", recall["json"])
    metrics.update(recall["metrics"])
    summary.extend(recall["summary"])
    return StageResult(metrics=metrics, summary=summary)


def _load_splits(data_dir: Path) -> dict[str, DetectionSplit]:
    index = json.loads((Path(data_dir) / INDEX_FILE).read_text(encoding="utf-8"))
    # Proposals need each image's id, path and size; recall reads the annotation file itself.
    return {name: DetectionSplit.load(data_dir, name, with_annotations=False) for name in index["splits"]}


# ----------------------------------------------------------------------------- RPN


# ----------------------------------------------------------------------------- sources


def _mcg_settings(mcfg, split: DetectionSplit) -> dict:
    files = locate_mcg_files(mcfg.dir, [(r.image_id, r.path.name) for r in split.images],
                             allow_missing=mcfg.allow_missing)
    return {"paths": {i: (str(p) if p else None) for i, p in files.paths.items()},
            "missing": len(files.missing), "min_size": mcfg.min_size, "top_n": mcfg.top_n}


def _compute_group(group: str, split: DetectionSplit, settings: dict, out: Path, ctx: StageContext,
                   *, config_key: str) -> dict[str, Path]:
    """Stores of `group`'s sources for `split`, computing only the shards not saved yet."""
    sources = GROUP_SOURCES[group]
    paths = {s: out / "sources" / f"{s}_{split.name}.h5" for s in sources}
    if all(p.exists() for p in paths.values()):
        return paths
    ids = [r.image_id for r in split.images]
    writers = {s: ShardedWriter(out / "parts" / f"{s}_{split.name}", ids, images_per_shard=IMAGES_PER_SHARD)
               for s in sources}
    by_id = {r.image_id: r for r in split.images}
    missing = [s for s in sources if not paths[s].exists()]  # a written store means its source is done
    # A task writes every source of its group; it is needed while a source without a store lacks it.
    pending = [shard for shard in writers[sources[0]].shards
               if any(not writers[s].is_done(shard) for s in missing)]
    tasks = [ShardTask(group=group, split=split.name, shard=shard,
                       images=tuple((i, str(by_id[i].path), by_id[i].width, by_id[i].height)
                                    for i in shard.image_ids),
                       parts_dirs={s: str(w.directory) for s, w in writers.items()},
                       settings=_task_settings(group, settings, shard))
             for shard in pending]
    if tasks:
        ctx.map(compute_shard, tasks, desc=f"{group} proposals ({split.name})", gpu=group == "rpn")
    (out / "sources").mkdir(exist_ok=True)
    for source in missing:
        write_store(paths[source], writers[source].iter_items(),
                    {"source": source, "split": split.name, "config_key": config_key})
    # Only once every source's store is written: the shards duplicate them.
    remove_parts([w.directory for w in writers.values()])
    return paths


def _task_settings(group: str, settings: dict, shard: Shard) -> dict:
    if group == "mcg":  # only this shard's file paths travel with the task
        return {**settings, "paths": {i: settings["paths"][i] for i in shard.image_ids}}
    return settings


def _rpn_model(weights: str, rcfg: RpnConfig) -> torch.nn.Module:
    """The RPN, loaded once per worker process (a task per shard would reload it);
    the file's mtime is in the key, so retrained weights are reloaded."""
    return cached("rpn", (weights, os.path.getmtime(weights)),
                  lambda: load_rpn(Path(weights), rcfg).to(worker_device()))


def compute_shard(task: ShardTask) -> int:
    """A Ray task: compute and save one shard of one source group; returns the image count."""
    if worker_device().type == "cpu":
        torch.set_num_threads(1)  # one task per core: Ray's tasks are the parallelism
    per_source: dict[str, list] = {s: [] for s in task.parts_dirs}
    settings = task.settings
    for image_id, path, width, height in task.images:
        if task.group == "mcg":
            mcg_path: Optional[str] = settings["paths"][image_id]
            if mcg_path is None:  # allowed missing: no boxes
                boxes, scores = np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
            else:
                boxes, scores = load_mcg_proposals(mcg_path, width=width, height=height,
                                                   min_size=settings["min_size"], top_n=settings["top_n"])
            per_source["mcg"].append((image_id, boxes, scores))
            continue
        image = load_image(Path(path), expected_size=(width, height))
        if task.group == "rpn":
            with torch.inference_mode():
                results = generate_proposals_all(_rpn_model(settings["weights"], settings["cfg"]), image,
                                                 settings["cfg"])
            for variant, (boxes, scores) in results.items():
                per_source[variant].append((image_id, boxes, scores))
        else:
            boxes, scores = selective_search_isolated(image, seed=image_id, **settings)
            per_source["selective_search"].append((image_id, boxes, scores))
    for source, items in per_source.items():
        write_shard(task.parts_dirs[source], task.shard, items)
    return len(task.images)


# ----------------------------------------------------------------------------- recall


def _recall_report(splits: dict[str, DetectionSplit], stores: dict[str, dict[str, Path]],
                   counts: tuple[int, ...], out: Path, ctx: StageContext) -> dict:
    """Recall per source and for the mix on the annotated evaluation splits."""
    report, metrics, summary = {}, {}, []
    plot_counts = curve_counts(counts)
    for split_name, split in splits.items():
        if split_name == "train" or not split.has_annotations:
            continue  # train recall would cost a pass over the largest split and say little new
        ground_truth = load_ground_truth(split.annotation_file)
        report[split_name], curves = {}, {}
        for source, path in ctx.progress(sorted(stores[split_name].items()), desc=f"recall ({split_name})"):
            with ProposalStore(path) as store:
                result = store_recall(store, ground_truth, plot_counts)
            report[split_name][source] = result.to_json()
            curves[source] = (result.counts, result.ar_curve().tolist())
            for key, value in result.metrics(counts).items():
                metrics[f"{split_name}_{source}_{key}"] = value
        plot_recall(curves, out / "plots" / f"recall_{split_name}.png",
                    title=f"Average recall vs proposals ({split_name})")
        top = max(counts)
        line = ", ".join(f"{s} {metrics[f'{split_name}_{s}_AR@{top}']:.3f}" for s in sorted(stores[split_name]))
        summary.append(f"{split_name} AR@{top} (IoU .5:.95): {line}")
    return {"json": report, "metrics": metrics, "summary": summary}
