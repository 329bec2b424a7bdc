"""`RunContext`: the orchestrator's side of the stage contract (stages/contract.py):
a stage's MLflow run, the invocation's Ray, and Ray Train for training stages."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Mapping, Protocol, Sequence, TypeVar

from pipeline.execution.progress import iterate
from pipeline.execution.stopping import NO_SIGNALS, StopSignals
from stages.contract import RuntimeConfig, TrainerOutcome, TrainerSetup

T = TypeVar("T")


class _Tracked(Protocol):
    run_id: str

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_model(self, artifacts: Mapping[str, Path], config_text: str) -> None: ...

    def log_to_model(self, path: Path, relative: str) -> None: ...

    def register_model(self, name: str, tags: Mapping[str, Any]) -> None: ...


class _Mapper(Protocol):
    def map(self, fn: Callable[[Any], T], items: Sequence[Any], desc: str, gpu: bool = False,
            on_result: Callable[[int, T], Any] | None = None) -> list: ...


class RunContext:
    """The `StageContext` the runner hands a stage: its MLflow run and the invocation's Ray."""

    def __init__(self, *, workdir: Path, runtime: RuntimeConfig, run: _Tracked, mapper: _Mapper,
                 stops: StopSignals = NO_SIGNALS, config_text: str = "",
                 model_run: _Tracked | None = None, registry: tuple[str, dict] | None = None) -> None:
        self.workdir = workdir
        self.runtime = runtime
        self._run = run
        self._mapper = mapper
        self._stops = stops
        self._config_text = config_text
        self._model_run = model_run  # the run that produced the train output, when there is one
        self._registry = registry  # (registered model name, version tags) for the model this stage logs

    def log_model(self, artifacts: dict[str, Path]) -> None:
        self._run.log_model(artifacts, self._config_text)
        if self._registry is not None:
            self._run.register_model(*self._registry)

    def link_to_model(self, path: Path, relative: str) -> None:
        if self._model_run is None:
            return
        self._model_run.log_to_model(path, relative)
        self._run.set_tags({"model_run_id": self._model_run.run_id})

    def graceful_stop(self) -> ContextManager[Callable[[], bool]]:
        return self._stops.graceful()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._run.log_metrics(metrics, step=step)

    def log_params(self, params: dict) -> None:
        self._run.log_params(params)

    def map(self, fn: Callable[[Any], T], items: Sequence[Any], desc: str, gpu: bool = False,
            on_result: Callable[[int, T], Any] | None = None) -> list:
        # runtime.device cpu keeps the tasks off the GPUs: a task that holds none
        # sees CUDA_VISIBLE_DEVICES="" (pipeline/cluster/tasks.py), so it stays on the CPU.
        return self._mapper.map(fn, items, desc, gpu=gpu and self.runtime.device != "cpu", on_result=on_result)

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None,
                 unit: str = "items") -> Iterable[T]:
        return iterate(iterable, desc, total=total, unit=unit)

    def train_placement(self, workers: int | None = None) -> tuple[bool, bool]:
        workers = workers or self.runtime.train_workers
        # Ray is not even imported for one CPU process.
        if workers == 1 and self.runtime.device == "cpu":
            return False, False
        from pipeline.cluster.train import use_ray_train
        return use_ray_train(self.runtime, workers=workers)

    def run_trainer(self, worker_fn: Callable[..., Any], worker_config: dict[str, Any],
                    setup: TrainerSetup) -> TrainerOutcome:
        from pipeline.cluster.train import run_trainer
        # Rank 0 logs the losses to this stage's MLflow run while it trains;
        # SIGTERM/SIGINT: the workers finish the current update, checkpoint it, stop.
        pending = getattr(self._run, "pending", None)
        before = pending.count() if pending is not None else 0
        try:
            with self._stops.graceful() as should_stop:
                return run_trainer(worker_fn, worker_config, setup, runtime=self.runtime,
                                   mlflow_run_id=getattr(self._run, "run_id", None), should_stop=should_stop)
        finally:
            # The workers queue what the store did not take; they cannot print (Ray keeps their output).
            waiting = pending.count() if pending is not None else 0
            if waiting > before:
                print(f"tracking: {waiting} record(s) wait in {pending.path} (MLflow did not take the training "
                      "workers' metrics); the end of this run or the next command sends them", flush=True)
