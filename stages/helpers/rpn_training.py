"""The proposals stage's RPN training: ion/engine/ in this process (one worker
on the CPU) or under Ray Train (several workers, or GPUs: one each), with
checkpoints in the stage's output so a rerun with the same key resumes, and
bitwise equal to an uninterrupted run on the CPU.

    <out>/rpn_checkpoints/last.pt             rolling: every proposals.rpn.checkpoint_every iterations
    <out>/rpn_checkpoints/phase<i>_<name>.pt  the state at the end of 'rpn' and 'rpn_step'
    <out>/rpn_ray/                            Ray Train's storage, when it ran there
    <out>/rpn.pt                              the trained weights (save_rpn), written by the stage

Losses, lr and images/s reach the stage's MLflow run every
proposals.rpn.log_every iterations while it trains (keys rpn_<name>).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ion.data.split import DetectionSplit
from ion.engine.checkpoint import CheckpointFiles
from ion.errors import UserError
from proposals.rpn.config import RpnConfig
from proposals.rpn.model import build_rpn, save_rpn
from proposals.rpn.train import RpnImage, rpn_phases, rpn_state_dict, train_rpn
from stages.contract import StageContext, TrainerSetup
from stages.helpers.worker_resume import keep_checkpoints, worker_start

CHECKPOINTS_DIR = "rpn_checkpoints"
RAY_DIR = "rpn_ray"
RAY_RUN_NAME = "rpn"


class RpnTrainImages:
    """The train split's images with at least one non-crowd box (the others
    give the RPN nothing to find), loaded when the engine asks for one."""

    def __init__(self, split: DetectionSplit) -> None:
        self.records = [r for r in split.images if len(r.boxes) and (~r.iscrowd).any()]
        if not self.records:
            raise UserError(f"{split.annotation_file}: no training image has a non-crowd box, so the RPN has "
                            "nothing to learn; check the data stage's train split")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> RpnImage:
        record = self.records[index]
        return record.load(), record.boxes, record.iscrowd


def rpn_workers(train_workers: int, images_per_batch: int) -> int:
    """Workers for the RPN: the most, up to runtime.train_workers, that split
    proposals.rpn.images_per_batch evenly (each takes the same number of images
    per update; Faster R-CNN's one image per update trains on one worker)."""
    return max(d for d in range(1, train_workers + 1) if images_per_batch % d == 0)


def train_rpn_stage(rcfg: RpnConfig, *, data_dir: Path, path: Path, out: Path, seed: int,
                    ctx: StageContext) -> dict[str, float]:
    """Train the RPN (resuming from out/rpn_checkpoints/), write its weights to
    `path` with save_rpn; returns the headline metrics."""
    files = CheckpointFiles(out / CHECKPOINTS_DIR)
    workers = rpn_workers(ctx.runtime.train_workers, rcfg.images_per_batch)
    distributed, use_gpu = ctx.train_placement(workers)
    if distributed:
        setup = TrainerSetup(num_workers=workers, use_gpu=use_gpu, storage_dir=out / RAY_DIR, name=RAY_RUN_NAME,
                             max_failures=rcfg.max_failures, keep_checkpoints=len(rpn_phases(rcfg)) + 1)
        outcome = ctx.run_trainer(rpn_train_worker, {"rcfg": rcfg, "seed": seed, "data_dir": str(data_dir),
                                                     "fallback_resume": str(files.last)}, setup)
        keep_checkpoints(outcome, files)
        images_per_s = float(outcome.return_value["images_per_s"])
        started_at = int(outcome.return_value["started_at"])
    else:
        resume = files.latest()
        if resume is not None:  # this MLflow run gets the whole curve
            for record in resume["history"]:
                ctx.log_metrics(loggable(record), step=int(record["iteration"]))
        start = resume["iteration"] if resume is not None else 0
        bar = iter(ctx.progress(range(start, rcfg.iterations), desc="rpn training",
                                total=rcfg.iterations - start, unit="iterations"))
        torch.manual_seed(seed)  # the initial weights (replaced when resuming)
        model = build_rpn(rcfg, load_imagenet=resume is None)
        # SIGTERM/SIGINT: finish the current update, checkpoint it, stop (the rerun resumes there).
        with ctx.graceful_stop() as should_stop:
            result = train_rpn(model, _train_images(data_dir), rcfg, seed=seed,
                               save_checkpoint=files, resume=resume,
                               log_metrics=lambda step, record: ctx.log_metrics(loggable(record), step=step),
                               on_iteration=lambda _: next(bar, None), should_stop=should_stop)
        for _ in bar:  # the closing progress line
            pass
        images_per_s, started_at = result.images_per_s, result.start_iteration
    if started_at:  # as the train stage says it
        print(f"rpn training: resumed at iteration {started_at} of {rcfg.iterations} "
              f"(from {files.last if not distributed else 'its Ray Train checkpoint'})", flush=True)
    state = files.latest()
    model = build_rpn(rcfg, load_imagenet=False)
    model.load_state_dict(rpn_state_dict(state))
    save_rpn(model, path, rcfg)
    history = state["history"]
    return {"rpn_iterations": float(state["iteration"]), "rpn_started_at": float(started_at),
            "rpn_images_per_s": images_per_s,
            "rpn_final_loss": float(history[-1]["loss"]) if history else float("nan")}


def _train_images(data_dir: str | Path) -> RpnTrainImages:
    """The train split's images and boxes: the RPN needs no segmentations (left out while the json is read)."""
    return RpnTrainImages(DetectionSplit.load(Path(data_dir), "train", with_masks=False))


def rpn_train_worker(session, *, rcfg: RpnConfig, seed: int, data_dir: str, fallback_resume: str) -> dict[str, Any]:
    """A Ray Train worker: resume from Ray Train's latest checkpoint, or from
    out/rpn_checkpoints/last.pt when that one is further along; rank 0 logs to
    the stage's MLflow run and reports progress while it trains."""
    resume = worker_start(session, Path(fallback_resume), loggable)
    torch.manual_seed(seed)
    model = build_rpn(rcfg, load_imagenet=resume is None)
    result = train_rpn(model, _train_images(data_dir), rcfg, seed=seed,
                       save_checkpoint=session.save, resume=resume, device=session.device,
                       log_metrics=lambda step, record: session.log_metrics(loggable(record), step=step),
                       on_iteration=lambda done: session.report_progress(done, rcfg.iterations,
                                                                         rcfg.images_per_batch),
                       should_stop=session.should_stop, rank=session.rank, world_size=session.world_size)
    return {"iterations": result.iterations, "images_per_s": result.images_per_s,
            "started_at": result.start_iteration}


def loggable(record: dict[str, float]) -> dict[str, float]:
    """An engine log record as the stage's MLflow metrics: rpn_loss, rpn_lr, rpn_loss_rpn1_objectness, ..."""
    return {f"rpn_{k.replace('/', '_')}": float(v) for k, v in record.items() if k != "iteration"}
