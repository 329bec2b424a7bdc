"""Run the selected stages: cache hits, locks, manifests, MLflow runs, the end summary.

For each selected stage in pipeline order: compute its key; a finished output
under that key is a cache hit (unless --force); otherwise take the stage's lock,
look again (another run may have produced it meanwhile), run the stage into its
directory, write the manifest last, log to MLflow. Before anything runs, every
upstream output a selected stage needs but that is not selected must exist.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ion.errors import UserError
from pipeline.cluster import Cluster
from pipeline.graph import SHORT_KEY, Stage, cache_keys
from pipeline.progress import emit, heartbeat
from pipeline.run_context import RunContext
from ion.schema import to_plain, to_yaml
from pipeline.store import MANIFEST, ArtifactStore
from pipeline.tracking import FAILED, FINISHED, KILLED, TrackedRun, Tracker, ui_hint
from stages.contract import StageResult

PLOTS_DIR = "plots"
_SUMMARY_METRICS = 6  # headline metrics per stage in the end summary
_SUMMARY_LINES = 4  # summary lines per stage in the end summary


@dataclass(frozen=True)
class StageOutcome:
    name: str
    key: str
    cached: bool
    seconds: float  # this invocation's time on the stage
    produced_seconds: float  # time the run that produced the output took
    path: Path
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RunReport:
    outcomes: list[StageOutcome]
    workdir: Path
    tracking_uri: str
    experiment: str
    parent_run_id: str


def check_upstream(stages: Sequence[Stage], selected: Sequence[Stage], keys: dict[str, str],
                   store: ArtifactStore, *, force: bool, command: str) -> None:
    """UserError when a selected stage that has to run consumes an output neither selected nor cached.

    A cache hit needs no inputs. The message names the stage, the missing output
    and the command that makes it (the missing stages, transitively, plus the selected ones).
    """
    by_name = {s.name: s for s in stages}
    chosen = {s.name for s in selected}
    producing = [s for s in selected if force or not store.exists(s.name, keys[s.name])]
    gaps = [(s.name, u) for s in producing for u in s.upstream
            if u not in chosen and not store.exists(u, keys[u])]
    if not gaps:
        return
    needed: set[str] = set()
    todo = [u for _, u in gaps]
    while todo:
        name = todo.pop()
        if name in needed or name in chosen or store.exists(name, keys[name]):
            continue
        needed.add(name)
        todo.extend(by_name[name].upstream)
    to_run = ",".join(s.name for s in stages if s.name in needed | chosen)
    stage, upstream = gaps[0]
    raise UserError(f"stage {stage!r} needs the output of {upstream!r} (key {keys[upstream][:SHORT_KEY]}) "
                    f"which is missing: run {command} --stages {to_run} (or --stages all)")


def run_stages(cfg: Any, *, stages: Sequence[Stage], selected: Sequence[Stage], tracker: Tracker,
               force: bool = False, command: str = "python -m pipeline run", run_name: str = "run",
               tags: dict[str, str] | None = None) -> RunReport:
    """Run `selected` (a subset of `stages`, in pipeline order) for `cfg`; see the module docstring.

    `command` is how the user invoked the run, without --stages: error messages
    suggest `<command> --stages ...`.
    """
    workdir = Path(cfg.runtime.workdir)
    store = ArtifactStore(workdir)
    keys = cache_keys(stages, cfg)
    check_upstream(stages, selected, keys, store, force=force, command=command)

    config_text = to_yaml(cfg)
    parent = tracker.start_parent(name=run_name, tags={"stages": ",".join(s.name for s in selected),
                                                       "workdir": str(workdir), **(tags or {})})
    parent.log_text(config_text, "config.yaml")
    cluster = Cluster(cfg.runtime, tracking_uri=tracker.tracking_uri)
    outcomes = []
    try:
        for stage in selected:
            outcomes.append(_run_one(stage, cfg, keys=keys, store=store, tracker=tracker, parent=parent,
                                     cluster=cluster, force=force, config_text=config_text))
    except KeyboardInterrupt:
        parent.finish(KILLED, error="interrupted")
        raise
    except BaseException as err:
        parent.finish(FAILED, error=_error_text(err))
        raise
    finally:
        cluster.close()
    parent.finish(FINISHED)
    return RunReport(outcomes=outcomes, workdir=workdir, tracking_uri=tracker.tracking_uri,
                     experiment=cfg.name, parent_run_id=parent.run_id)


def _error_text(err: BaseException) -> str:
    return str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"


def _run_one(stage: Stage, cfg: Any, *, keys: dict[str, str], store: ArtifactStore, tracker: Tracker,
             parent: TrackedRun, cluster: Cluster, force: bool, config_text: str) -> StageOutcome:
    key = keys[stage.name]
    start = time.perf_counter()
    if not force and store.exists(stage.name, key):
        return _reuse(stage, cfg, key=key, store=store, tracker=tracker, parent=parent, start=start)
    with store.locked(stage.name, key):
        # Another run may have produced it while we waited for the lock.
        if not force and store.exists(stage.name, key):
            return _reuse(stage, cfg, key=key, store=store, tracker=tracker, parent=parent, start=start)
        out = store.prepare(stage.name, key, clear=force)
        run = tracker.start_stage(parent, stage=stage.name, key=key, cache_hit=False)
        run.log_params({name: to_plain(getattr(cfg, name)) for name in stage.reads})
        run.log_text(config_text, "config.yaml")
        ctx = RunContext(workdir=store.workdir, runtime=cfg.runtime, run=run, mapper=cluster)
        inputs = {name: store.path(name, keys[name]) for name in stage.upstream}
        begun = time.perf_counter()
        emit(f"stage {stage.name}: started (key {key[:SHORT_KEY]})")
        try:
            with heartbeat(f"stage {stage.name}"):
                result = stage.run(cfg, inputs, out, ctx)
            if not isinstance(result, StageResult):
                raise TypeError(f"stage {stage.name!r} returned {type(result).__name__}, not a StageResult")
        except KeyboardInterrupt:
            run.finish(KILLED, error="interrupted")
            raise
        except BaseException as err:
            run.finish(FAILED, error=_error_text(err))
            raise
        seconds = time.perf_counter() - begun
        metrics = {k: float(v) for k, v in result.metrics.items()}
        store.write_manifest(stage.name, key, version=stage.version,
                             upstream={u: keys[u] for u in stage.upstream}, run_id=run.run_id,
                             timings={"run_s": round(seconds, 3)}, metrics=metrics, summary=list(result.summary))
    run.log_metrics(metrics)
    run.log_file(out / MANIFEST)
    if (out / PLOTS_DIR).is_dir():
        run.log_dir(out / PLOTS_DIR, PLOTS_DIR)
    run.finish(FINISHED)
    emit(f"stage {stage.name}: finished in {seconds:.1f}s")
    return StageOutcome(name=stage.name, key=key, cached=False, seconds=time.perf_counter() - start,
                        produced_seconds=seconds, path=out, run_id=run.run_id, metrics=metrics,
                        summary=list(result.summary))


def _reuse(stage: Stage, cfg: Any, *, key: str, store: ArtifactStore, tracker: Tracker, parent: TrackedRun,
           start: float) -> StageOutcome:
    """A cache hit: a child run that says so and points to the run that produced the output."""
    manifest = store.manifest(stage.name, key)
    assert manifest is not None, "a cache hit has a manifest"
    emit(f"stage {stage.name}: cached (key {key[:SHORT_KEY]})")
    produced_by = manifest.get("mlflow_run_id")
    run = tracker.start_stage(parent, stage=stage.name, key=key, cache_hit=True, produced_by=produced_by)
    run.log_params({name: to_plain(getattr(cfg, name)) for name in stage.reads})
    run.log_file(store.path(stage.name, key) / MANIFEST)
    run.finish(FINISHED)
    return StageOutcome(name=stage.name, key=key, cached=True, seconds=time.perf_counter() - start,
                        produced_seconds=float(manifest.get("timings", {}).get("run_s", 0.0)),
                        path=store.path(stage.name, key), run_id=run.run_id,
                        metrics=dict(manifest.get("metrics", {})), summary=list(manifest.get("summary", [])))


def format_summary(report: RunReport) -> str:
    """The one-screen summary printed at the end of `pipeline run`."""
    lines = [f"{'stage':<10} {'result':<7} {'seconds':>8}  key", "-" * 44]
    for o in report.outcomes:
        result, seconds = ("cached", f"({o.produced_seconds:.1f})") if o.cached else ("ran", f"{o.seconds:.1f}")
        lines.append(f"{o.name:<10} {result:<7} {seconds:>8}  {o.key[:SHORT_KEY]}")
        shown = list(o.metrics.items())[:_SUMMARY_METRICS]
        if shown:
            lines.append("    " + "  ".join(f"{k} {v:.4g}" for k, v in shown))
        lines.extend(f"    {text}" for text in o.summary[:_SUMMARY_LINES])
    lines += ["", f"outputs: {report.workdir / 'artifacts'}/<stage>/<key>/",
              f"MLflow:  experiment {report.experiment!r}, run {report.parent_run_id}",
              f"         {ui_hint(report.tracking_uri)}"]
    return "\n".join(lines)
