"""Where a training worker (ION or RPN, under Ray Train) starts from, and what
the stage keeps when it ends.

Both training stages resume the same way: from Ray Train's latest checkpoint,
or from the stage's own last.pt when that one is further along (a run that
trained in one process before, or whose Ray storage was lost)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ion.engine.checkpoint import CheckpointFiles, load_checkpoint
from ion.errors import Interrupted
from stages.contract import TrainerOutcome, TrainSession


def worker_start(session: TrainSession, fallback: Path,
                 loggable: Callable[[dict[str, float]], dict[str, float]]) -> Optional[dict[str, Any]]:
    """The state to resume from (None: start afresh). Also gives each CPU worker
    its share of the cores, and logs the resumed history to the stage's MLflow
    run (the session skips the steps the run already holds)."""
    if session.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // session.world_size))
    resume = session.resume_state()
    if Path(fallback).is_file():
        local = load_checkpoint(Path(fallback))
        if resume is None or local["iteration"] > resume["iteration"]:
            resume = local
    if resume is not None:
        for record in resume["history"]:
            session.log_metrics(loggable(record), step=int(record["iteration"]))
    return resume


def keep_checkpoints(outcome: TrainerOutcome, files: CheckpointFiles) -> None:
    """Copy the phase ends and the latest checkpoint Ray Train kept into the
    stage's checkpoint files; then, when the workers stopped on a SIGTERM or
    SIGINT, raise Interrupted (last.pt holds the update they stopped after)."""
    for kept in outcome.checkpoints:
        if kept.phase_end:
            kept.copy_to(files.phase_path(kept.phase_index, kept.phase_name))
    if outcome.latest is not None:
        outcome.latest.copy_to(files.last)
    if outcome.interrupted:
        raise Interrupted(outcome.interrupted)
