"""What `run` does with the plan: the one-line estimate per stage at its start (from the
calibration alone, nothing parsed), each finished stage's measurements recorded into the
calibration, and predicted against measured time per stage at its end."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from ion.data.split import INDEX_FILE
from pipeline.plan.estimate import (
    Calibration,
    StageEstimate,
    assumed_candidates,
    device_kind,
    estimate_stage,
    format_seconds,
    one_line,
    record_run,
)
from pipeline.plan.measure import disk_bytes, peak_rss_bytes, process_tree, reset_peaks
from pipeline.plan.work import detect_candidates, measured_work

DATA_STAGE = "data"
DETECT_STAGE = "detect"


def split_counts(cfg: Any, data_output: Path | None) -> dict[str, int] | None:
    """Images per split: from the data stage's output when it exists, from the config for the
    synthetic set, else None (counting a COCO split means parsing its annotations: `plan` does)."""
    if data_output is not None:
        try:
            index = json.loads((data_output / INDEX_FILE).read_text(encoding="utf-8"))
            return {name: int(s["num_images"]) for name, s in index["splits"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    data = getattr(cfg, "data", None)  # a config without a data section (the runner's tests) counts nothing
    if getattr(data, "source", None) == "synthetic":
        syn = data.synthetic
        return {"train": data.sampled(syn.num_train), "minival": data.sampled(syn.num_minival),
                "test": data.sampled(syn.num_test)}
    return None


class StageMeter:
    """Peak RSS of this process tree and the output's disk, around one stage's run."""

    def __init__(self) -> None:
        reset_peaks()

    def finish(self, out: Path) -> dict[str, int | None]:
        return {"peak_rss_bytes": peak_rss_bytes(process_tree()), "disk_bytes": disk_bytes(out)}


def detect_metrics(store: Any, keys: Mapping[str, str]) -> dict[str, float] | None:
    """The metrics of this config's finished detect output (its candidates per image), if any."""
    if DETECT_STAGE not in keys or not store.exists(DETECT_STAGE, keys[DETECT_STAGE]):
        return None
    return (store.manifest(DETECT_STAGE, keys[DETECT_STAGE]) or {}).get("metrics") or None


def run_estimates(cfg: Any, selected: Sequence[Any], *, materials: Mapping[str, tuple[str, dict]],
                  cached: Mapping[str, bool], data_output: Path | None,
                  detected: Mapping[str, float] | None = None) -> dict[str, StageEstimate]:
    """Estimates of `selected`; `detected`: detect's metrics when its output exists (the real
    candidate counts of tune and evaluate)."""
    counts = split_counts(cfg, data_output)
    calibration, device = Calibration(Path(cfg.runtime.workdir)), device_kind(cfg.runtime)
    per_image = assumed_candidates(calibration, cfg, materials.get(DETECT_STAGE, (None, None))[1], device)
    return {s.name: estimate_stage(s.name, cfg, material=materials[s.name][1], counts=counts,
                                   cached=cached[s.name], calibration=calibration, device=device,
                                   candidates=detect_candidates(detected), assumed_per_image=per_image)
            for s in selected}


def estimate_lines(estimates: Mapping[str, StageEstimate]) -> list[str]:
    if not any(e.seconds is not None for e in estimates.values() if not e.cached):
        to_run = [e.name for e in estimates.values() if not e.cached]
        if to_run:
            return [f"estimate: none yet for {','.join(to_run)} (no calibration on this device kind; this run "
                    f"records one; `python -m pipeline plan --calibrate` measures one on a sample first)"]
    return ["estimate: " + one_line(e) for e in estimates.values()]


def record_stage(cfg: Any, name: str, *, material: dict, data_output: Path | None,
                 measured: Mapping[str, Any], metrics: Mapping[str, float],
                 detected: Mapping[str, float] | None) -> None:
    gpus = 0.0
    if device_kind(cfg.runtime) != "cpu":
        gpus = float(cfg.runtime.train_workers if name == "train" else 1)
    work = measured_work(name, cfg, split_counts(cfg, data_output), metrics, detected)
    record_run(Path(cfg.runtime.workdir), name, cfg, material=material, work=work, metrics=metrics,
               measured=measured, gpus=gpus)


def predicted_timings(estimate: StageEstimate | None) -> dict[str, float]:
    """The estimate a stage started with, kept in its manifest's timings beside what it measured."""
    if estimate is None or estimate.cached:
        return {}
    figures = {"predicted_s": estimate.seconds, "predicted_disk_bytes": estimate.disk_bytes,
               "predicted_peak_rss_bytes": estimate.peak_rss_bytes}
    return {k: float(v) for k, v in figures.items() if v is not None}


def comparison_lines(estimates: Mapping[str, StageEstimate], measured: Mapping[str, float]) -> list[str]:
    """`predicted vs measured` per stage that ran (the end of `run`)."""
    lines = []
    for name, seconds in measured.items():
        e = estimates.get(name)
        if e is None or e.cached:
            continue
        if e.seconds is None:
            lines.append(f"    {name:<10} predicted ?  measured {format_seconds(seconds)} (now calibrated)")
            continue
        error = 100.0 * (e.seconds - seconds) / max(seconds, 1e-9)
        lines.append(f"    {name:<10} predicted {format_seconds(e.seconds)}  measured {format_seconds(seconds)}  "
                     f"({error:+.0f}%)")
    return ["predicted vs measured time:", *lines] if lines else []


def record_outputs(cfg: Any, stages: Sequence[Any], store: Any) -> list[str]:
    """Record into the calibration what the finished outputs of `cfg` measured (their manifests'
    timings): a calibration rebuilt from a workdir's outputs. Returns the stages recorded."""
    from pipeline.graph import cache_materials

    materials = cache_materials(stages, cfg)
    keys = {name: key for name, (key, _) in materials.items()}
    data_output = store.path(DATA_STAGE, keys[DATA_STAGE]) if store.exists(DATA_STAGE, keys[DATA_STAGE]) else None
    done, detected = [], detect_metrics(store, keys)
    for name, (key, material) in materials.items():
        manifest = store.manifest(name, key) or {}
        timings = manifest.get("timings", {})
        if "disk_bytes" not in timings:
            continue  # written before outputs were measured
        record_stage(cfg, name, material=material, data_output=data_output,
                     measured={"seconds": timings["run_s"], **timings}, metrics=manifest.get("metrics", {}),
                     detected=detected)
        done.append(name)
    return done
