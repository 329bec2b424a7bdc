"""Ray Train for the train stage (pipeline/cluster/tasks.py starts Ray for it).

Written against Ray Train V2 (ray >= 2.5x, on unless RAY_TRAIN_V2_ENABLED=0),
whose public API is ray.train.torch.TorchTrainer, ray.train.ScalingConfig /
RunConfig / FailureConfig / CheckpointConfig, and inside a worker
ray.train.get_context(), ray.train.get_checkpoint(), ray.train.report().

Driver side: `run_trainer(worker_fn, worker_config, setup)` runs
`worker_fn(session, **worker_config)` on `setup.num_workers` workers (one
process each, gloo on CPUs, nccl with one GPU each) and returns the
checkpoints Ray Train kept. A failed worker group is restarted up to
`max_failures` times; the workers then resume from the last reported
checkpoint. A later `run_trainer` with the same `storage_dir` and `name` (a
rerun of the stage with the same cache key) finds that run's checkpoints too.

Worker side: `WorkerSession` gives the rank, world size, device, the state to
resume from, and `save(state, event)`, the ion.train_loop checkpoint callback
that reports to Ray Train; `log_metrics` (rank 0 logs straight to the stage's
MLflow run, whose id the driver passes in) and `report_progress` (rank 0
writes done/total to a small file in the storage directory, which the driver
polls and prints as progress lines: Ray does not forward worker stdout,
pipeline/cluster/tasks.py).

Gradients are all-reduced by ion/engine/ itself (ion/engine/grad_sync.py:
buckets sent during the backward of each worker's last image) instead of
wrapping the model in DistributedDataParallel (ray.train.torch.prepare_model):
DDP fixes at construction which parameters carry gradients, and the frozen
groups change from one phase to the next.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import ray
import ray.train
import ray.train.torch
import torch

from ion.atomic import atomic_path, write_json_atomic
from ion.engine.checkpoint import CheckpointEvent, load_checkpoint, write_checkpoint
from ion.engine.loop import NonFiniteLossError
from ion.errors import Interrupted, UserError
from pipeline.cluster.tasks import cluster_gpus, init_ray
from pipeline.execution.progress import Progress
from stages.contract import RuntimeConfig, TrainerOutcome, TrainerSetup

CHECKPOINT_FILE = "checkpoint.pt"
# Ray Train keeps the `keep_checkpoints` reports with the highest score (and
# always the latest): phase ends score above every rolling checkpoint.
KEEP_SCORE = "keep_score"
_PHASE_END_BONUS = 1e15
_PROGRESS_WRITE_S = 0.5  # rank 0 writes its progress file at most this often (and at the end)
_PROGRESS_POLL_S = 0.25  # the driver reads it this often


@dataclass(frozen=True)
class ReportedCheckpoint:
    """A checkpoint Ray Train kept: what the worker reported with it and where it is."""

    iteration: int
    phase_index: int
    phase_name: str
    phase_end: bool
    checkpoint: ray.train.Checkpoint

    def copy_to(self, path: Path) -> Path:
        """Copy its state file to `path` (atomically), from wherever the storage is."""
        with self.checkpoint.as_directory() as directory, atomic_path(path) as tmp:
            shutil.copyfile(Path(directory) / CHECKPOINT_FILE, tmp)
        return Path(path)


def use_ray_train(runtime: RuntimeConfig, workers: Optional[int] = None) -> tuple[bool, bool]:
    """(run under Ray Train, with GPUs): Ray Train when there are several
    workers (`workers`, default runtime.train_workers) or the cluster has GPUs
    (runtime.device cpu never asks for them)."""
    workers = workers or runtime.train_workers
    wants_gpu = runtime.device != "cpu"
    if wants_gpu:
        remote = runtime.ray_address or os.environ.get("RAY_ADDRESS")
        if remote:
            init_ray(runtime)
            has_gpu = cluster_gpus() >= 1
        else:  # a local Ray instance would get this machine's GPUs
            has_gpu = torch.cuda.is_available()
        if runtime.device == "cuda" and not has_gpu:
            raise UserError("runtime.device: cuda, but neither this machine nor the Ray cluster has a GPU; "
                            "set runtime.device: auto or cpu")
    else:
        has_gpu = False
    return workers > 1 or has_gpu, has_gpu


def run_trainer(worker_fn: Callable[..., Any], worker_config: dict[str, Any], setup: TrainerSetup,
                runtime: Optional[RuntimeConfig] = None, mlflow_run_id: Optional[str] = None,
                should_stop: Optional[Callable[[], bool]] = None) -> TrainerOutcome:
    """Run `worker_fn(session, **worker_config)` under a TorchTrainer.

    The workers' `session.log_metrics` goes to the MLflow run `mlflow_run_id`
    (nowhere when None); their `session.report_progress` is printed here as
    progress lines named `setup.name`.

    `should_stop` (the driver's SIGTERM/SIGINT flag) is polled here; once it
    is True the workers finish their current update, rank 0 reports a
    checkpoint of it and they return: the outcome's `interrupted` says where.
    The request reaches them as a file in the storage directory (a cluster's
    nodes share it: Ray Train keeps its checkpoints there).

    worker_fn must be importable by the workers (a module-level function).
    A non-finite loss stops every worker at once and is raised here as
    NonFiniteLossError, a UserError as a UserError, both without retries (they
    would come back on every retry); any other worker error is retried
    `max_failures` times, then raised here.
    """
    if runtime is not None:
        init_ray(runtime)
    elif not ray.is_initialized():
        raise RuntimeError("run_trainer needs Ray: pass runtime or call pipeline.cluster.tasks.init_ray first")
    setup.storage_dir.mkdir(parents=True, exist_ok=True)
    progress_file = setup.storage_dir / f"{setup.name}.progress.json"
    progress_file.unlink(missing_ok=True)  # an earlier run's
    stop_file = setup.storage_dir / f"{setup.name}.stop"
    stop_file.unlink(missing_ok=True)  # an earlier, interrupted run's request
    trainer = ray.train.torch.TorchTrainer(
        _worker_entry,
        train_loop_config={"fn": worker_fn, "config": worker_config, "mlflow_run_id": mlflow_run_id,
                           "progress_file": str(progress_file), "stop_file": str(stop_file)},
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if setup.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=setup.num_workers, use_gpu=setup.use_gpu,
                                               resources_per_worker=_worker_resources(setup)),
        run_config=ray.train.RunConfig(
            name=setup.name,
            storage_path=str(setup.storage_dir.resolve()),
            failure_config=ray.train.FailureConfig(max_failures=setup.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=setup.keep_checkpoints, checkpoint_score_attribute=KEEP_SCORE,
                checkpoint_score_order="max"),
        ),
    )
    # Ray Train installs its own SIGINT handler in fit() (abort the run at once,
    # no checkpoint) and leaves it there; the CLI's (pipeline/stopping.py) must
    # stay: the first Ctrl-C finishes the update with a checkpoint, a second stops.
    if hasattr(trainer, "_register_sigint_handler"):
        trainer._register_sigint_handler = lambda controller: None
    try:
        with _ProgressPrinter(progress_file, desc=setup.name, should_stop=should_stop, stop_file=stop_file):
            result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise _worker_error(err) from err
    value = result.return_value
    if isinstance(value, dict) and "non_finite" in value:
        raise NonFiniteLossError(value["non_finite"])
    if isinstance(value, dict) and "user_error" in value:
        raise UserError(value["user_error"])
    interrupted = value.get("interrupted") if isinstance(value, dict) else None
    kept = [_reported(ckpt, metrics) for ckpt, metrics in (result.best_checkpoints or [])]
    kept.sort(key=lambda c: (c.iteration, c.phase_end))
    latest = None
    if result.checkpoint is not None:
        latest = next((c for c in kept if c.checkpoint.path == result.checkpoint.path), None)
    return TrainerOutcome(return_value=value, checkpoints=kept, latest=latest, interrupted=interrupted)


def _worker_resources(setup: TrainerSetup) -> dict[str, float]:
    """One GPU per worker on GPUs; on CPUs at most one CPU each, less when the
    Ray instance has fewer CPUs than workers (runtime.num_workers < train_workers),
    so the worker group can start at all."""
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    resources = {"CPU": min(1.0, cpus / setup.num_workers)}
    if setup.use_gpu:
        resources["GPU"] = 1.0
    return resources


def _reported(checkpoint: ray.train.Checkpoint, metrics: dict[str, Any]) -> ReportedCheckpoint:
    return ReportedCheckpoint(iteration=int(metrics["iteration"]), phase_index=int(metrics["phase_index"]),
                              phase_name=str(metrics["phase_name"]), phase_end=bool(metrics["phase_end"]),
                              checkpoint=checkpoint)


def _worker_error(err: Exception) -> Exception:
    """The workers' own exception when there is one: a UserError stays one."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank in sorted(failures):
        cause = failures[rank]
        cause = getattr(cause, "cause", None) or cause
        if isinstance(cause, UserError):
            return UserError(str(cause))
    if failures:
        rank = min(failures)
        return RuntimeError(f"training failed on Ray Train worker {rank}: {failures[rank]}")
    return RuntimeError(f"training failed: {err}")


class _ProgressPrinter:
    """While Ray Train runs: read the progress file rank 0 writes
    ({"done", "total", "images_per_iteration"}) and print progress lines; pass
    a stop request on (write `stop_file` once `should_stop()` is True)."""

    def __init__(self, path: Path, *, desc: str, should_stop: Optional[Callable[[], bool]] = None,
                 stop_file: Optional[Path] = None) -> None:
        self._path = path
        self._should_stop = should_stop
        self._stop_file = stop_file
        self._stop_sent = False
        self._desc = desc
        self._stop = threading.Event()
        self._bar: Optional[Progress] = None
        self._thread = threading.Thread(target=self._poll, name="train-progress", daemon=True)

    def _read(self) -> None:
        try:
            state = json.loads(self._path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # not written yet
        if self._bar is None:
            self._bar = Progress(self._desc, int(state["total"]), unit="it", start=int(state["done"]),
                                 also=("images", float(state["images_per_iteration"])))
        if int(state["done"]) != self._bar.done:
            self._bar.set(int(state["done"]))

    def _poll(self) -> None:
        while not self._stop.wait(_PROGRESS_POLL_S):
            if not self._stop_sent and self._should_stop is not None and self._should_stop():
                write_json_atomic(self._stop_file, {"requested": time.time()})
                self._stop_sent = True
            self._read()

    def __enter__(self) -> "_ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._read()  # the final count
        if self._bar is not None:
            self._bar.close()


class WorkerSession:
    """What a Ray Train worker needs: rank, world size, device, resume state,
    checkpoint reports, live metrics and progress."""

    def __init__(self, *, mlflow_run_id: Optional[str] = None, progress_file: Optional[str] = None,
                 stop_file: Optional[str] = None) -> None:
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self._run_id = mlflow_run_id
        self._run: Any = None
        self._logged_up_to: Optional[int] = None
        self._progress_file = Path(progress_file) if progress_file else None
        self._progress_written = 0.0
        self._stop_file = Path(stop_file) if stop_file else None

    def should_stop(self) -> bool:
        """ion/engine's should_stop: rank 0 reads the driver's stop request (the
        engine spreads its answer to every worker with the update's loss sums)."""
        return self.rank == 0 and self._stop_file is not None and self._stop_file.exists()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Rank 0 logs `metrics` at `step` to the stage's MLflow run at once.
        Steps at or below the highest one the run already holds (for the
        first key) are skipped: a worker group restarted after a failure, or a
        resumed run, logs each point once."""
        if self.rank != 0 or self._run_id is None or not metrics:
            return
        if self._run is None:
            from pipeline.tracking.worker import run_by_id  # mlflow only where it is used: rank 0
            self._run = run_by_id(self._run_id)
            self._logged_up_to = self._run.last_step(next(iter(metrics)))
        if self._logged_up_to is not None and step <= self._logged_up_to:
            return
        self._run.log_metrics(metrics, step=step)

    def report_progress(self, done: int, total: int, images_per_iteration: int = 1) -> None:
        """Rank 0 records `done` of `total` iterations for the driver's progress lines."""
        if self.rank != 0 or self._progress_file is None:
            return
        now = time.monotonic()
        if done < total and now - self._progress_written < _PROGRESS_WRITE_S:
            return
        self._progress_written = now
        write_json_atomic(self._progress_file, {"done": done, "total": total,
                                                "images_per_iteration": images_per_iteration})

    def resume_state(self) -> Optional[dict[str, Any]]:
        """The last reported checkpoint's state (after a worker failure, or in a
        rerun with the same storage and name), else None."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return load_checkpoint(Path(directory) / CHECKPOINT_FILE)

    def save(self, state: dict[str, Any], event: CheckpointEvent) -> str:
        """ion.train_loop's save_checkpoint: rank 0 reports the state as a Ray Train
        checkpoint; every rank reports (the report is a barrier)."""
        name = (f"phase{event.phase_index}_{event.phase_name}" if event.phase_end
                else f"iteration_{event.iteration:09d}")
        metrics = {"iteration": event.iteration, "phase_index": event.phase_index, "phase_name": event.phase_name,
                   "phase_end": event.phase_end,
                   KEEP_SCORE: event.iteration + (_PHASE_END_BONUS if event.phase_end else 0.0)}
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return f"Ray Train checkpoint {name}"
        with tempfile.TemporaryDirectory(prefix="ion-train-") as directory:
            write_checkpoint(state, Path(directory) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=name)
        return f"Ray Train checkpoint {name}"


def _worker_entry(config: dict[str, Any]) -> Any:
    """TorchTrainer's train_loop_per_worker: run the stage's worker function.
    A stop request (the driver's SIGTERM), a non-finite loss (raised on every
    worker together, ion/engine/) and a user error (bad config, a bad init_from file) are returned rather than
    raised, so Ray Train does not retry them: they would come back on every
    retry. A worker that dies is retried (FailureConfig)."""
    session = WorkerSession(mlflow_run_id=config.get("mlflow_run_id"), progress_file=config.get("progress_file"),
                            stop_file=config.get("stop_file"))
    try:
        return config["fn"](session, **config["config"])
    except Interrupted as err:  # the driver's stop request, after the checkpoint of this update
        return {"interrupted": str(err)}
    except NonFiniteLossError as err:
        return {"non_finite": str(err)}
    except UserError as err:
        return {"user_error": str(err)}
