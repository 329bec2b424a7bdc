"""Run the selected stages: cache hits, locks, manifests, MLflow runs, the end summary.

For each selected stage in pipeline order: compute its key; a finished output
under that key is a cache hit (unless --force); otherwise take the stage's lock,
look again (another run may have produced it meanwhile), run the stage into its
directory, write the manifest last, log to MLflow. Before anything runs, every
upstream output a selected stage needs but that is not selected must exist.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ion.atomic import remove_temporaries
from ion.errors import UserError
from ion.schema import to_plain, to_yaml
from pipeline.cache.store import MANIFEST, ArtifactStore
from pipeline.cluster.tasks import Cluster
from pipeline.execution.progress import emit, heartbeat
from pipeline.execution.run_context import RunContext
from pipeline.execution.stopping import NO_SIGNALS, StopSignals
from pipeline.graph import SHORT_KEY, Stage, cache_materials
from pipeline.plan.estimate import StageEstimate
from pipeline.plan.observe import (
    StageMeter,
    comparison_lines,
    detect_metrics,
    estimate_lines,
    predicted_timings,
    record_stage,
    run_estimates,
)
from pipeline.plan.resources import TRAIN_STAGE, check_resources
from pipeline.tracking.client import CODE_VERSION_TAG, FAILED, FINISHED, KILLED, TrackedRun, Tracker
from pipeline.tracking.registry import registered_model_name
from pipeline.tracking.uri import ui_hint
from stages.contract import StageResult

PLOTS_DIR = "plots"
MODEL_STAGE = "train"  # its MLflow run holds the detector as an MLflow model
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
    experiment_id: str | None = None  # None when the store never answered
    pending_records: int = 0  # tracking records MLflow did not take, kept in pending_path
    pending_path: Path | None = None
    tracking_error: str | None = None
    predicted: list[str] = field(default_factory=list)  # predicted vs measured time per stage that ran


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


def _read_outputs(stages: Sequence[Stage], selected: Sequence[Stage], *, force: bool) -> list[Stage]:
    """The stages whose finished outputs this run would read: selected cache hits and the
    upstream outputs of the stages it will run, in pipeline order."""
    read: list[str] = []
    for s in selected:
        if not force:
            read.append(s.name)
        read.extend(s.upstream)
    return [s for s in stages if s.name in read]


def set_aside_damaged(stages: Sequence[Stage], selected: Sequence[Stage], keys: dict[str, str],
                      store: ArtifactStore, *, force: bool) -> dict[str, list[str]]:
    """Check the finished outputs this run would read against their manifests; a
    damaged one is set aside (it no longer exists, so it is recomputed) and said
    so on stderr. Returns {stage: damaged files}."""
    damaged = {}
    for name in (s.name for s in _read_outputs(stages, selected, force=force)):
        if not store.exists(name, keys[name]):
            continue
        bad = store.damaged(name, keys[name])
        if bad:
            store.set_aside(name, keys[name], bad)
            damaged[name] = bad
            out = store.path(name, keys[name])
            print(f"damaged: {out / bad[0]}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} does not "
                  f"match the manifest of {name}; set aside, it is recomputed", file=sys.stderr, flush=True)
    return damaged


def relocate_outputs(cfg: Any, stages: Sequence[Stage], selected: Sequence[Stage], keys: dict[str, str],
                     store: ArtifactStore, *, force: bool) -> dict[str, tuple[str, ...]]:
    """Bring the finished outputs this run would read to the places the config names now
    (a stage's RELOCATE: a dataset moved to another disk keeps its key, its output's
    record of where the images are is rewritten in place, under the output's lock, the
    manifest checksumming the new files). Returns {stage: the config fields that moved}."""
    moved = {}
    for stage in _read_outputs(stages, selected, force=force):
        key = keys[stage.name]
        if stage.relocate is None or not store.exists(stage.name, key):
            continue
        with store.locked(stage.name, key):
            if not store.exists(stage.name, key):
                continue
            relocation = stage.relocate(cfg, store.path(stage.name, key))
            if relocation is None:
                continue
            store.rewrite(stage.name, key, relocation.files)
        moved[stage.name] = relocation.fields
        emit(f"stage {stage.name}: relocated ({', '.join(relocation.fields)}): {relocation.note}; "
             f"key {key[:SHORT_KEY]} and the outputs after it kept")
    return moved


def run_stages(cfg: Any, *, stages: Sequence[Stage], selected: Sequence[Stage], tracker: Tracker,
               force: bool = False, command: str = "python -m pipeline run", run_name: str = "run",
               tags: dict[str, str] | None = None, stops: StopSignals = NO_SIGNALS) -> RunReport:
    """Run `selected` (a subset of `stages`, in pipeline order) for `cfg`; see the module docstring.

    `command` is how the user invoked the run, without --stages: error messages
    suggest `<command> --stages ...`. `stops`: the CLI's SIGTERM/SIGINT handling
    (pipeline/execution/stopping.py), handed to the stages through their context.
    """
    workdir = Path(cfg.runtime.workdir)
    store = ArtifactStore(workdir)
    materials = cache_materials(stages, cfg)
    keys = {name: key for name, (key, _) in materials.items()}
    if workdir.is_dir():  # what a killed command left beside the stores (stage outputs: see store.prepare)
        remove_temporaries(workdir, recursive=False, dead_only=True)
    set_aside_damaged(stages, selected, keys, store, force=force)
    relocate_outputs(cfg, stages, selected, keys, store, force=force)
    check_upstream(stages, selected, keys, store, force=force, command=command)
    cached = {s.name: not force and store.exists(s.name, keys[s.name]) for s in selected}
    # Before any stage: a training job the cluster cannot hold fails here in one line, not after the others ran.
    problems = check_resources(cfg.runtime, trains=TRAIN_STAGE in cached and not cached[TRAIN_STAGE])
    if problems:
        raise UserError(problems[0])
    estimates = run_estimates(cfg, selected, materials=materials, cached=cached,
                              data_output=_data_output(store, keys), detected=detect_metrics(store, keys))
    for line in estimate_lines(estimates):
        emit(line)
    tracker.flush_pending()  # what an earlier run could not send
    tracker.close_abandoned()  # runs of a command killed with SIGKILL

    config_text = to_yaml(cfg)
    # Named for the config and the stages asked for: "smoke: all", "default: tune".
    parent = tracker.start_parent(name=f"{cfg.name}: {run_name}",
                                  tags={"stages": ",".join(s.name for s in selected), "workdir": str(workdir),
                                        **(tags or {})})
    parent.log_text(config_text, "config.yaml")
    cluster = Cluster(cfg.runtime, tracking_uri=tracker.tracking_uri)
    outcomes = []
    try:
        for stage in selected:
            if not cached[stage.name]:
                # What the stage's inputs now tell (the split sizes, detect's candidates): its estimate
                # at its start, the one its measured time is held against.
                now = run_estimates(cfg, [stage], materials=materials, cached=cached,
                                    data_output=_data_output(store, keys), detected=detect_metrics(store, keys))
                if now[stage.name] != estimates[stage.name] and now[stage.name].seconds is not None:
                    estimates.update(now)
                    for line in estimate_lines(now):
                        emit(line)
            outcomes.append(_run_one(stage, cfg, keys=keys, material=materials[stage.name][1], store=store,
                                     tracker=tracker, parent=parent, cluster=cluster, force=force,
                                     config_text=config_text, stops=stops, estimate=estimates[stage.name]))
    except KeyboardInterrupt:
        parent.finish(KILLED, error="interrupted")
        raise
    except BaseException as err:
        parent.finish(FAILED, error=_error_text(err))
        raise
    finally:
        cluster.close()
    headline = headline_metrics(outcomes)
    parent.log_metrics(headline)
    _tag_registered_model(cfg, tracker, store, keys, headline)
    parent.finish(FINISHED)
    pending = tracker.flush_pending()
    predicted = comparison_lines(estimates, {o.name: o.produced_seconds for o in outcomes if not o.cached})
    return RunReport(outcomes=outcomes, workdir=workdir, tracking_uri=tracker.tracking_uri,
                     experiment=tracker.experiment_name, experiment_id=tracker.known_experiment_id(),
                     parent_run_id=parent.run_id, pending_records=pending,
                     pending_path=tracker.pending.path, tracking_error=tracker.offline_error, predicted=predicted)


def _data_output(store: ArtifactStore, keys: dict[str, str]) -> Path | None:
    """The data stage's finished output for these keys (split sizes for estimates), if any."""
    return store.path("data", keys["data"]) if "data" in keys and store.exists("data", keys["data"]) else None


def _error_text(err: BaseException) -> str:
    return str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"


def _run_one(stage: Stage, cfg: Any, *, keys: dict[str, str], material: dict, store: ArtifactStore,
             tracker: Tracker, parent: TrackedRun, cluster: Cluster, force: bool, config_text: str,
             stops: StopSignals = NO_SIGNALS, estimate: StageEstimate | None = None) -> StageOutcome:
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
        ctx = RunContext(workdir=store.workdir, runtime=cfg.runtime, run=run, mapper=cluster, stops=stops,
                         config_text=config_text, model_run=_model_run(tracker, store, keys),
                         registry=(registered_model_name(cfg),
                                   {"cache_key": key, CODE_VERSION_TAG: tracker.common_tags[CODE_VERSION_TAG],
                                    "config": cfg.name}))
        inputs = {name: store.path(name, keys[name]) for name in stage.upstream}
        meter = StageMeter()
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
        measured = meter.finish(out)
        metrics = {k: float(v) for k, v in result.metrics.items()}
        made = out
        out = store.path(stage.name, key)
        # A --force run made it aside (the old output stayed usable until now): its lines name the final place.
        summary = [line.replace(str(made), str(out)) for line in result.summary]
        store.write_manifest(stage.name, key, version=stage.version,
                             upstream={u: keys[u] for u in stage.upstream}, run_id=run.run_id,
                             timings={"run_s": round(seconds, 3), **measured, **predicted_timings(estimate)},
                             metrics=metrics, summary=summary,
                             out=made, material=material)
        store.publish(stage.name, key, made)
        record_stage(cfg, stage.name, material=material, data_output=_data_output(store, keys),
                     measured={"seconds": seconds, **measured}, metrics=metrics,
                     detected=detect_metrics(store, keys))
    run.log_metrics(metrics)
    run.log_file(out / MANIFEST)
    if (out / PLOTS_DIR).is_dir():
        run.log_dir(out / PLOTS_DIR, PLOTS_DIR)
    run.finish(FINISHED)
    emit(f"stage {stage.name}: finished in {seconds:.1f}s")
    return StageOutcome(name=stage.name, key=key, cached=False, seconds=time.perf_counter() - start,
                        produced_seconds=seconds, path=out, run_id=run.run_id, metrics=metrics,
                        summary=summary)


def _model_run(tracker: Tracker, store: ArtifactStore, keys: dict[str, str]) -> TrackedRun | None:
    """The MLflow run that produced this config's train output (it holds the model), if any."""
    manifest = store.manifest(MODEL_STAGE, keys[MODEL_STAGE]) if MODEL_STAGE in keys else None
    run_id = manifest.get("mlflow_run_id") if manifest else None
    return tracker.run(run_id) if run_id else None


def _tag_registered_model(cfg: Any, tracker: Tracker, store: ArtifactStore, keys: dict[str, str],
                          headline: dict[str, float]) -> None:
    """The test AP of this config's trained detector on its Model Registry version."""
    scores = {k: f"{headline[k]:.4g}" for k in ("test_AP", "test_AP50") if k in headline}
    model_run = _model_run(tracker, store, keys) if scores else None
    if model_run is not None:
        model_run.tag_model_versions(registered_model_name(cfg), scores)


def headline_metrics(outcomes: Sequence[StageOutcome]) -> dict[str, float]:
    """What the parent run shows for the stages it ran or reused: test AP, AP50, APs and context AP,
    the tuned thresholds, training speed, the proposal mix's AR."""
    by_name = {o.name: o.metrics for o in outcomes}
    headline: dict[str, float] = {}
    for key in ("AP", "AP50", "APs", "context_AP"):
        if key in by_name.get("evaluate", {}):
            headline[f"test_{key}"] = by_name["evaluate"][key]
    tune = by_name.get("tune", {})
    for source, target in (("best_nms_iou", "tuned_nms_iou"), ("best_vote_iou", "tuned_vote_iou"),
                           ("best_AP", "minival_AP_tuned")):
        if source in tune:
            headline[target] = tune[source]
    if "images_per_s" in by_name.get("train", {}):
        headline["train_images_per_s"] = by_name["train"]["images_per_s"]
    recall = [(split, int(m.group(1)), v) for k, v in by_name.get("proposals", {}).items()
              for split in ("test", "minival") if (m := re.fullmatch(rf"{split}_mix_AR@(\d+)", k))]
    if recall:
        split, count, value = max(recall, key=lambda r: (r[0] == "test", r[1]))
        headline[f"proposal_AR@{count}"] = value
    return headline


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
              f"         {ui_hint(report.tracking_uri, report.experiment_id)}"]
    if report.predicted:
        lines += ["", *report.predicted]
    if report.pending_records:
        why = f" ({report.tracking_error})" if report.tracking_error else ""
        lines.append(f"         {report.pending_records} tracking record(s) not sent{why}: kept "
                     f"in {report.pending_path}, sent by the next run once MLflow answers")
    return "\n".join(lines)
