"""`python -m pipeline plan`: the preflight and the estimate for `run`'s flags, printed (or one
JSON object with --json) and logged to MLflow as a run of its own; exit 2 when a problem would
stop the run."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

from ion.errors import UserError
from pipeline.cache.store import ArtifactStore
from pipeline.graph import Stage, cache_materials
from pipeline.plan.calibrate import CALIBRATE_COST, origins
from pipeline.plan.estimate import (
    Calibration,
    StageEstimate,
    assumed_candidates,
    calibration_key,
    device_kind,
    estimate_stage,
    format_bytes,
    format_seconds,
    one_line,
)
from pipeline.plan.observe import detect_metrics, split_counts
from pipeline.plan.preflight import (
    Preflight,
    check_coco,
    check_disk,
    check_mcg,
    check_rpn_weights,
    check_weights,
    read_data_output,
)
from pipeline.plan.resources import TRAIN_STAGE, check_resources
from pipeline.plan.work import detect_candidates, uses_rpn


def _inputs(cfg: Any, runs: set[str], data_output: Path | None, report: Preflight) -> None:
    if "data" in runs:
        if cfg.data.source == "coco":
            check_coco(cfg.data.coco, report, cfg.data.sample_images)
        elif cfg.data.source == "synthetic":
            report.counts = split_counts(cfg, None)
        else:
            report.notes.append(f"data.source {cfg.data.source}: its folders are checked by the data stage, "
                                f"not here; the estimate waits for its output")
    elif data_output is not None:
        read_data_output(data_output, report)
    if "proposals" in runs and cfg.proposals.bottom_up == "mcg" and cfg.proposals.mcg.dir:
        check_mcg(cfg.proposals.mcg, report)
    if "proposals" in runs and uses_rpn(cfg.proposals):
        check_rpn_weights(cfg.proposals.rpn, report)
    if TRAIN_STAGE in runs:
        check_weights(cfg.model, 1, report)


def make_plan(cfg: Any, *, stages: Sequence[Stage], selected: Sequence[Stage], force: bool = False,
              check_upstream_fn=None, calibrate_fn=None) -> tuple[dict[str, Any], Preflight, dict[str, StageEstimate]]:
    """(the --json object, the preflight, the estimates) for running `selected` of `stages`.
    `calibrate_fn(cached=, materials=, device=)`: run after a preflight without problems, before
    the estimate (plan --calibrate); returns note lines."""
    workdir = Path(cfg.runtime.workdir)
    store = ArtifactStore(workdir)
    materials = cache_materials(stages, cfg)
    keys = {name: key for name, (key, _) in materials.items()}
    cached = {s.name: not force and store.exists(s.name, keys[s.name]) for s in selected}
    runs = {name for name, hit in cached.items() if not hit}
    data_output = store.path("data", keys["data"]) if store.exists("data", keys["data"]) else None
    report = Preflight()
    if check_upstream_fn is not None:
        report.attempt(lambda: check_upstream_fn(keys=keys, store=store))
    report.problems += report.attempt(lambda: check_resources(cfg.runtime, trains=TRAIN_STAGE in runs)) or []
    _inputs(cfg, runs, data_output, report)
    device = device_kind(cfg.runtime)
    if calibrate_fn is not None:
        if report.problems:
            report.notes.append("calibration: not run (the preflight found problems: the sample would stop on "
                                "them too)")
        else:
            report.notes += calibrate_fn(cached=cached, materials=materials, device=device)
    calibration = Calibration(workdir)
    per_image = assumed_candidates(calibration, cfg, materials.get("detect", (None, None))[1], device)
    candidates = detect_candidates(detect_metrics(store, keys))
    estimates = {s.name: estimate_stage(s.name, cfg, material=materials[s.name][1], counts=report.counts,
                                        cached=cached[s.name], calibration=calibration, device=device,
                                        candidates=candidates, assumed_per_image=per_image)
                 for s in selected}
    to_run = [e for e in estimates.values() if not e.cached]
    known_disk = [e for e in to_run if e.disk_bytes is not None]
    predicted = sum(e.disk_bytes for e in known_disk)
    detail = ", ".join(f"{e.name} {format_bytes(e.disk_bytes)}" for e in known_disk) or "no calibration"
    free = check_disk(workdir, predicted, report, detail)
    measured = [e.name for e in to_run if e.seconds is not None]
    plan = {
        "problems": list(report.problems),
        "stages": {name: e.as_json() for name, e in estimates.items()},
        "total_seconds": sum(e.seconds or 0.0 for e in to_run),
        # Where each figure comes from, and what the estimate rests on.
        "calibration": {"device": device, "dir": str(calibration.dir), "measured": measured,
                        "assumed": [e.name for e in to_run if e.seconds is None],
                        "sources": {name: {"unit": e.unit, "source": e.source,
                                           **_origin(e, calibration.records(name, calibration_key(
                                               name, cfg, materials[name][1], device)))}
                                    for name, e in estimates.items()},
                        "split_images": report.counts, "predicted_disk_bytes": predicted, "free_disk_bytes": free,
                        "workdir": str(workdir)},
    }
    return plan, report, estimates


def _origin(e: StageEstimate, records: list[dict[str, Any]]) -> dict[str, Any]:
    """figures: cached, measured or assumed (no figure); measured_from: {"sample": n, "runs": m}
    records of the on-demand calibration sample and of this workdir's runs."""
    if e.cached:
        return {"figures": "cached", "measured_from": {}}
    if e.seconds is None:
        return {"figures": "assumed", "measured_from": {}}
    return {"figures": "measured", "measured_from": origins(records)}


_FROM = {"sample": "the calibration sample", "runs": "this workdir's runs"}


def _estimate_line(e: StageEstimate, source: dict[str, Any]) -> str:
    if not source["measured_from"]:
        return one_line(e)
    return f"{one_line(e)} [from {' and '.join(_FROM[k] for k in source['measured_from'])}]"


def format_plan(plan: dict[str, Any], estimates: dict[str, StageEstimate], notes: Sequence[str]) -> str:
    problems, cal = len(plan["problems"]), plan["calibration"]
    lines = [f"preflight: {problems} problem(s){' (on stderr: the run would stop)' if problems else ''}",
             *(f"  note: {n}" for n in notes)]
    if cal["split_images"]:
        lines.append("  images: " + ", ".join(f"{k} {v}" for k, v in cal["split_images"].items()))
    lines += ["", f"estimate on {plan['calibration']['device']} (calibration: {plan['calibration']['dir']}):"]
    lines += [f"  {_estimate_line(e, cal['sources'][e.name])}" for e in estimates.values()]
    unknown = f" (without {', '.join(cal['assumed'])}: no calibration)" if cal["assumed"] else ""
    if cal["assumed"]:
        lines.append(f"  no calibration for {', '.join(cal['assumed'])} on {cal['device']}: "
                     f"`python -m pipeline plan --calibrate` measures every stage on two small samples of this config "
                     f"({CALIBRATE_COST})")
    lines += [f"total: ~{format_seconds(plan['total_seconds'])}{unknown}; disk "
              f"{format_bytes(cal['predicted_disk_bytes'])} of {format_bytes(cal['free_disk_bytes'])} free in "
              f"{cal['workdir']}"]
    return "\n".join(lines)


def log_plan(cfg: Any, plan: dict[str, Any], *, config_file: Path | None, argv: Sequence[str]) -> str | None:
    """The plan as an MLflow run of its own (metrics per stage, plan.json); its run id, or None when
    the store cannot take it (a preflight problem says why)."""
    from pipeline.tracking.client import FAILED, FINISHED, Tracker
    from pipeline.tracking.uri import tracking_uri_for

    workdir = Path(cfg.runtime.workdir)
    tracker = Tracker(tracking_uri=tracking_uri_for(workdir), experiment=cfg.name, workdir=workdir,
                      config_file=config_file)
    run = tracker.start_parent(name=f"{cfg.name}: plan", tags={"command": " ".join(["python", "-m", "pipeline",
                                                                                      *argv]), "plan": "true"})
    metrics = {"total_seconds": plan["total_seconds"], "problems": float(len(plan["problems"]))}
    for name, s in plan["stages"].items():
        for figure in ("items", "seconds", "gpu_hours", "disk_bytes", "peak_rss_bytes"):
            if s[figure] is not None:
                metrics[f"{name}_{figure}"] = float(s[figure])
    run.log_metrics(metrics)
    run.log_text(json.dumps(plan, indent=1), "plan.json")
    run.finish(FAILED if plan["problems"] else FINISHED, error="; ".join(plan["problems"])[:500] or None)
    return run.run_id


def run_plan(cfg: Any, *, stages: Sequence[Stage], selected: Sequence[Stage], as_json: bool,
             config_file: Path | None, argv: Sequence[str], force: bool = False, check_upstream_fn=None,
             calibrate_fn=None) -> int:
    """Print the plan; 2 when a problem would stop the run, else 0."""
    plan, report, estimates = make_plan(cfg, stages=stages, selected=selected, force=force,
                                        check_upstream_fn=check_upstream_fn, calibrate_fn=calibrate_fn)
    notes = list(report.notes)
    mlflow_problem = _tracking_problem(cfg, config_file)
    if mlflow_problem:
        plan["problems"].append(mlflow_problem)
    else:
        try:
            notes.append(f"plan logged to MLflow: run {log_plan(cfg, plan, config_file=config_file, argv=argv)}")
        except OSError as err:  # a full or read-only workdir: the disk check above says which
            notes.append(f"plan not logged to MLflow: {err}")
    for problem in plan["problems"]:
        print(f"problem: {problem}", file=sys.stderr)
    if as_json:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    print(json.dumps(plan, indent=1) if as_json else format_plan(plan, estimates, notes), flush=True)
    return 2 if plan["problems"] else 0


def _tracking_problem(cfg: Any, config_file: Path | None) -> str | None:
    from pipeline.tracking.client import Tracker
    from pipeline.tracking.uri import tracking_uri_for

    workdir = Path(cfg.runtime.workdir)
    try:
        Tracker(tracking_uri=tracking_uri_for(workdir), experiment=cfg.name, workdir=workdir,
                config_file=config_file).check_reachable()
    except UserError as err:
        return str(err)
    return None
