"""The stage contract: what a stage receives and returns, and what it may ask
of the orchestrator. The stages import only this from the orchestration side;
pipeline/ implements it (pipeline/execution/run_context.py) and knows the stages, so the
import arrow runs one way.

    def run(cfg, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult

A stage logs, maps per-item work and runs distributed training through `ctx`;
it never imports mlflow or ray.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Literal, Optional, Protocol, Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RuntimeConfig:
    """The `runtime` config section: where and how the pipeline runs. Never part
    of a cache key: the same config on a laptop and on a cluster produces the
    same artifacts."""

    workdir: str = field(
        default="workdir",
        metadata={"help": "directory for artifacts/ and mlflow.db (relative: to the config file; "
                          "--workdir overrides it)", "path": True})
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto", metadata={"help": "where stages run torch: auto = cuda when available, else cpu"})
    num_workers: int = field(
        default=2, metadata={"help": "CPUs of the local Ray instance that per-item maps run on", "min": 1})
    train_workers: int = field(
        default=1, metadata={"help": "Ray Train workers (one DDP process each)", "min": 1})
    ray_address: Optional[str] = field(
        default=None,
        metadata={"help": "Ray cluster to join (e.g. ray://head:10001 or auto); null: the RAY_ADDRESS "
                          "environment variable, else a local Ray instance"})


@dataclass(frozen=True)
class StageResult:
    """What `run` returns: headline metrics (logged, shown in the end summary) and summary lines."""

    metrics: dict[str, float] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Relocation:
    """What a stage's optional `relocate(cfg, out) -> Relocation | None` returns when a finished
    output records places of its inputs that the config now names elsewhere (a dataset moved to
    another disk): the key, made of the inputs' content, is the same, so the orchestrator rewrites
    these files of the output in place, checksums them into its manifest, and says so."""

    fields: tuple[str, ...]  # the config fields whose places changed ("data.coco.train_images")
    files: dict[str, bytes]  # output-relative path -> its new content
    note: str  # what changed, for the user ("images read from /fast/coco/train2017")


@dataclass(frozen=True)
class TrainerSetup:
    """How to run a distributed training job (Ray Train's TorchTrainer underneath)."""

    num_workers: int
    use_gpu: bool
    storage_dir: Path  # where the job keeps its checkpoints (shared storage on a cluster)
    name: str  # the same storage_dir + name resumes the same job
    max_failures: int  # dead worker groups restarted from the last checkpoint
    keep_checkpoints: int  # phase-end checkpoints to keep + 1 rolling


class KeptCheckpoint(Protocol):
    """A checkpoint the training job kept, and what its worker reported with it."""

    iteration: int
    phase_index: int
    phase_name: str
    phase_end: bool

    def copy_to(self, path: Path) -> Path:
        """Copy its state file to `path`, atomically."""


@dataclass(frozen=True)
class TrainerOutcome:
    return_value: Any  # what the worker function returned on rank 0
    checkpoints: list[Any]  # KeptCheckpoint, oldest first
    latest: Optional[Any]  # KeptCheckpoint or None
    interrupted: Optional[str] = None  # the workers stopped on a stop request: where (latest holds that update)


class TrainSession(Protocol):
    """What a training worker function gets as its first argument."""

    rank: int
    world_size: int
    device: Any  # torch.device

    def resume_state(self) -> Optional[dict[str, Any]]:
        """The last reported checkpoint's state, or None."""

    def save(self, state: dict[str, Any], event: Any) -> str:
        """ion.engine's checkpoint callback: store `state`, say where."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log to the stage's MLflow run while training runs (rank 0 only logs;
        steps the run already holds are skipped, so a resumed run may log its
        whole history)."""

    def report_progress(self, done: int, total: int, images_per_iteration: int = 1) -> None:
        """`done` of `total` iterations finished: the driver prints progress lines (rank 0 only reports)."""

    def should_stop(self) -> bool:
        """ion/engine's should_stop: the driver got SIGTERM/SIGINT (finish this update, checkpoint, stop)."""


class StageContext(Protocol):
    workdir: Path
    runtime: RuntimeConfig

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log metrics to the stage's MLflow run (e.g. losses per iteration with `step`)."""

    def log_params(self, params: dict) -> None:
        """Log extra params to the stage's MLflow run (nested dicts become dotted keys)."""

    def map(self, fn: Callable[[Any], T], items: Sequence[Any], desc: str, gpu: bool = False,
            on_result: Callable[[int, T], Any] | None = None) -> list:
        """`[fn(item) for item in items]` as Ray tasks, in item order, with progress.
        `on_result(index, result)` runs in the driver as each task finishes (any order) and what it
        returns is kept in the result's place: large results are consumed, not held."""

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None,
                 unit: str = "items") -> Iterable[T]:
        """`iterable` with progress lines: done/total, `unit`/s, ETA (pipeline/execution/progress.py)."""

    def log_model(self, artifacts: dict[str, Path]) -> None:
        """Log the trained detector, made of these files (name -> path: model.json, final.pt,
        rpn.pt), with the run's config as an MLflow model in the stage's run (`model/`)."""

    def link_to_model(self, path: Path, relative: str) -> None:
        """Add a file to the MLflow model logged by the run that produced the train output
        (model/<relative>, e.g. thresholds/best.json), and tag this stage's run with that run's id.
        A no-op when no such run is known."""

    def train_placement(self, workers: int | None = None) -> tuple[bool, bool]:
        """(train as a distributed job, with GPUs) for `workers` (default
        runtime.train_workers) and the cluster's GPUs."""

    def graceful_stop(self) -> ContextManager[Callable[[], bool]]:
        """Within the block SIGTERM/SIGINT do not interrupt the stage: the yielded
        callable turns True and the stage stops at its next safe point by raising
        ion.errors.Interrupted (training: after the current update, with a
        checkpoint). Outside it, and at a second signal, the stage is interrupted at once."""

    def run_trainer(self, worker_fn: Callable[..., Any], worker_config: dict[str, Any],
                    setup: TrainerSetup) -> TrainerOutcome:
        """Run `worker_fn(session: TrainSession, **worker_config)` on setup.num_workers workers;
        the session's log_metrics reaches this stage's MLflow run while it trains. A
        SIGTERM/SIGINT to the driver (the first) makes the workers stop after
        their current update with a checkpoint of it: the outcome's
        `interrupted` says so (stages/helpers/worker_resume.py keeps it and raises)."""

