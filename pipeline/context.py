"""What a stage sees of the orchestration: `StageContext` (a Protocol) and `StageResult`.

Stages import only this module from pipeline/: they log and map through `ctx`
and never touch mlflow or ray (docs/CONTRACTS.md, "Stage API").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, TypeVar

from tqdm import tqdm

from pipeline.runtime import RuntimeConfig

T = TypeVar("T")


@dataclass(frozen=True)
class StageResult:
    """What `run` returns: headline metrics (logged, shown in the end summary) and summary lines."""

    metrics: dict[str, float] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)


class StageContext(Protocol):
    workdir: Path
    runtime: RuntimeConfig

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log metrics to the stage's MLflow run (e.g. losses per iteration with `step`)."""

    def log_params(self, params: dict) -> None:
        """Log extra params to the stage's MLflow run (nested dicts become dotted keys)."""

    def map(self, fn: Callable[[Any], T], items: Sequence[Any], desc: str, gpu: bool = False) -> list[T]:
        """`[fn(item) for item in items]` as Ray tasks, in item order, with a progress bar."""

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
        """`iterable` with a progress bar."""


class _Tracked(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...


class _Mapper(Protocol):
    def map(self, fn: Callable[[Any], T], items: Sequence[Any], desc: str, gpu: bool = False) -> list[T]: ...


class RunContext:
    """The `StageContext` the runner hands a stage: its MLflow run and the invocation's Ray."""

    def __init__(self, *, workdir: Path, runtime: RuntimeConfig, run: _Tracked, mapper: _Mapper) -> None:
        self.workdir = workdir
        self.runtime = runtime
        self._run = run
        self._mapper = mapper

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._run.log_metrics(metrics, step=step)

    def log_params(self, params: dict) -> None:
        self._run.log_params(params)

    def map(self, fn: Callable[[Any], T], items: Sequence[Any], desc: str, gpu: bool = False) -> list[T]:
        # runtime.device cpu keeps the tasks off the GPUs: a task that asks for none
        # gets CUDA_VISIBLE_DEVICES="" from Ray, so its torch.cuda.is_available() is False.
        return self._mapper.map(fn, items, desc, gpu=gpu and self.runtime.device != "cpu")

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
        # disable=None: a bar on a terminal, nothing in logs and CI.
        return tqdm(iterable, desc=desc, total=total, disable=None, leave=False)
