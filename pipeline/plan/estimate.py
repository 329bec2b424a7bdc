"""Each stage's time, disk and peak memory, predicted from a calibration for the work it has
(pipeline/plan/work.py).

The calibration is what earlier runs of the same stage measured on the same device kind: every
finished stage records its work, seconds, disk bytes and peak RSS under a key of its code, its
config without the data set's size and paths (data.source only) and without the count fields
(iterations, trials, detect.max_images), and the device kind. One record gives per-item figures;
two or more at different sizes give a fixed part plus a per-item part (least squares), so the
start-up of Ray and of the model is not multiplied by the image count. A part timed on its own
(the RPN's training) is fitted against its own measure and the rest against the stage's.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ion.atomic import write_bytes_atomic
from pipeline.plan.work import (
    PARTS,
    RSS_PER_ITEM,
    Work,
    figure_measure,
    flat_memory,
    shown_measure,
    stage_work,
    time_measure,
    unit_of,
)

CALIBRATION_DIR = "calibration"
MAX_RECORDS = 8  # per stage and key: the most recent sizes
FIGURES = ("seconds", "disk_bytes", "peak_rss_bytes")
# Config fields that only say how much work there is (work.py's measures): not in the key.
_COUNT_FIELDS = {"train": ("phases", "iterations"), "tune": ("trials",), "detect": ("max_images",),
                 "proposals": ("rpn", "iterations")}


@dataclass(frozen=True)
class StageEstimate:
    name: str
    items: int | None  # the stage's work as shown (work.py): images, images seen, trial images...
    unit: str
    cached: bool
    seconds: float | None = None
    gpu_hours: float | None = None
    disk_bytes: int | None = None
    peak_rss_bytes: int | None = None
    source: str = "no calibration"  # "measured: N runs (items ...)" or why there is no figure
    work: Mapping[str, float | None] | None = None
    assumed: tuple[str, ...] = ()  # measures not counted but assumed (candidates before detect ran)

    def as_json(self) -> dict[str, Any]:
        return {"items": self.items, "unit": self.unit, "seconds": self.seconds, "gpu_hours": self.gpu_hours,
                "disk_bytes": self.disk_bytes, "peak_rss_bytes": self.peak_rss_bytes, "cached": self.cached,
                "work": dict(self.work or {}), "assumed": list(self.assumed)}


def device_kind(runtime: Any) -> str:
    """What a calibration is valid for: the GPU's name, or cpu."""
    if getattr(runtime, "device", "cpu") != "cpu":
        import torch

        if torch.cuda.is_available():
            return f"cuda:{torch.cuda.get_device_name(0)}"
    return "cpu"


def _drop_path(value: Any, path: tuple[str, ...]) -> Any:
    if isinstance(value, list):
        return [_drop_path(item, path) for item in value]
    if not isinstance(value, dict) or path[0] not in value:
        return value
    if len(path) == 1:
        return {k: v for k, v in value.items() if k != path[0]}
    return {**value, path[0]: _drop_path(value[path[0]], path[1:])}


def _drop_counts(section: str, value: Any) -> Any:
    path = _COUNT_FIELDS.get(section)
    return _drop_path(value, path) if path else value


def calibration_key(name: str, cfg: Any, material: Mapping[str, Any], device: str) -> str:
    """Code, config and device kind; not the data set, the files named (a path does not change the
    work per item: its size does, through the item counts) nor the counts of work."""
    from pipeline.cache.fingerprint import section_json_without_paths

    reads = {}
    for section in material["reads"]:
        if section == "data":
            reads[section] = cfg.data.source
            continue
        reads[section] = _drop_counts(section, json.loads(section_json_without_paths(cfg, section)))
    text = json.dumps({"stage": name, "code": material["code"]["fingerprint"], "reads": reads, "device": device},
                      sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


class Calibration:
    """The records under <workdir>/calibration/<stage>-<key>.json."""

    def __init__(self, workdir: Path) -> None:
        self.dir = Path(workdir) / CALIBRATION_DIR

    def _file(self, name: str, key: str) -> Path:
        return self.dir / f"{name}-{key}.json"

    def records(self, name: str, key: str) -> list[dict[str, Any]]:
        try:
            data = json.loads(self._file(name, key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []  # none yet, or torn: an estimate is never worth failing a run over
        return [r for r in data.get("records", []) if isinstance(r, dict) and r.get("items")]

    def add(self, name: str, key: str, record: dict[str, Any]) -> None:
        kept = [r for r in self.records(name, key) if r["items"] != record["items"]]
        kept = (kept + [{**record, "recorded_at": time.time()}])[-MAX_RECORDS:]
        self.dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self._file(name, key), json.dumps({"stage": name, "key": key, "records": kept},
                                                             indent=1).encode("utf-8"))


def _fit(points: list[tuple[float, float]], *, flat: bool = False) -> tuple[float, float]:
    """(fixed, per item) through the points: least squares with both parts >= 0. One size: all per
    item, or all fixed with `flat` (a process's peak memory is mostly its baseline: the measured
    peaks at 144 and 718 images differ by 0-17%, docs/SCALE.md)."""
    xs = [x for x, _ in points]
    if len(set(xs)) < 2:
        if flat:
            return sum(y for _, y in points) / len(points), 0.0
        return 0.0, sum(y for _, y in points) / max(sum(xs), 1e-9)
    mx, my = sum(xs) / len(points), sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    fixed = my - slope * mx
    if slope < 0:
        return my, 0.0
    if fixed < 0:
        return 0.0, sum(x * y for x, y in points) / sum(x * x for x in xs)
    return fixed, slope


def _points(records: list[dict[str, Any]], measure: str, value) -> list[tuple[float, float]]:
    points = []
    for r in records:
        x, y = r.get("work", {}).get(measure), value(r)
        if x is not None and y is not None:
            points.append((float(x), float(y)))
    return points


def _at(points: list[tuple[float, float]], x: float | None, *, flat: bool = False,
        flat_in_work: bool = False, per_item: float | None = None) -> float | None:
    """The fit through `points` at `x`. `flat_in_work`: the largest y whatever x (a streamed stage's
    memory: two nearby sizes' noise would otherwise extrapolate to a slope); `per_item`: a known
    slope on top of the largest baseline the points leave."""
    if x is None or not points:
        return None
    if per_item is not None:
        return max(y - per_item * px for px, y in points) + per_item * x
    if flat_in_work:
        return max(y for _, y in points)
    fixed, per_item = _fit(points, flat=flat)
    return fixed + per_item * x


def predict(name: str, records: list[dict[str, Any]], work: Work) -> dict[str, float | None]:
    """seconds, disk_bytes, peak_rss_bytes and gpus of stage `name` for `work`, from its records."""

    def rest(r: dict[str, Any]) -> float | None:  # the stage's time without its separately timed parts
        return None if r.get("seconds") is None else r["seconds"] - sum(r.get("parts", {}).values())

    seconds = _at(_points(records, time_measure(name), rest), work[time_measure(name)])
    for part, (measure, _) in PARTS.get(name, {}).items():
        points = [(float(r["work"][measure]), float(r["parts"][part])) for r in records
                  if part in r.get("parts", {}) and r.get("work", {}).get(measure)]
        if seconds is not None and work[measure]:
            extra = _at(points, work[measure])
            seconds = None if extra is None else seconds + extra  # no record of that part yet: unknown
    out: dict[str, float | None] = {"seconds": seconds}
    for figure in ("disk_bytes", "peak_rss_bytes"):
        measure = figure_measure(name, figure)
        memory = figure == "peak_rss_bytes"
        out[figure] = _at(_points(records, measure, lambda r, f=figure: r.get(f)), work[measure], flat=memory,
                          flat_in_work=memory and flat_memory(name),
                          per_item=RSS_PER_ITEM.get(name) if memory else None)
    out["gpus"] = max((float(r.get("gpus", 0)) for r in records), default=0.0)
    return out


def assumed_candidates(calibration: Calibration, cfg: Any, material: Mapping[str, Any] | None,
                       device: str) -> float | None:
    """Candidates per image that the calibration's detect runs kept (None: none recorded)."""
    if material is None:
        return None
    ratios = [r["work"]["candidates"] / r["work"]["images"]
              for r in calibration.records("detect", calibration_key("detect", cfg, material, device))
              if r.get("work", {}).get("candidates") is not None and r["work"].get("images")]
    return sum(ratios) / len(ratios) if ratios else None


def estimate_stage(name: str, cfg: Any, *, material: Mapping[str, Any], counts: Mapping[str, int] | None,
                   cached: bool, calibration: Calibration, device: str,
                   candidates: Mapping[str, float] | None = None,
                   assumed_per_image: float | None = None) -> StageEstimate:
    """`candidates`: detect's candidates per image and split when it has run; else
    `assumed_per_image` (assumed_candidates) stands in for them."""
    work = stage_work(name, cfg, counts, candidates=candidates, assumed_candidates=assumed_per_image)
    shown, what = work[shown_measure(name)], unit_of(shown_measure(name))
    items = None if shown is None else int(round(shown))
    if cached:
        return StageEstimate(name, items, what, cached=True, seconds=0.0, gpu_hours=0.0, disk_bytes=0,
                             peak_rss_bytes=0, source="cached: costs nothing", work=work.measures)
    records = [r for r in calibration.records(name, calibration_key(name, cfg, material, device)) if "work" in r]
    if items is None or work[time_measure(name)] is None:
        why = ("work unknown until the data stage's inputs can be read" if items is None else
               "candidates unknown until detect runs (no calibration of detect yet)")
        return StageEstimate(name, items, what, cached=False, source=why, work=work.measures)
    if not records:
        return StageEstimate(name, items, what, cached=False, work=work.measures, assumed=work.assumed,
                             source=f"assumed: no calibration for this model on {device} yet (any run records one)")
    fig = predict(name, records, work)
    sizes = ", ".join(f"{r['items']:.0f}" for r in records)
    what_fitted = unit_of(time_measure(name))
    seconds = fig["seconds"]
    note = "; candidates per image assumed from the calibration's detect runs" if work.assumed else ""
    return StageEstimate(
        name, items, what, cached=False, seconds=seconds,
        gpu_hours=None if seconds is None else seconds * float(fig["gpus"] or 0.0) / 3600.0,
        disk_bytes=None if fig["disk_bytes"] is None else int(fig["disk_bytes"]),
        peak_rss_bytes=None if fig["peak_rss_bytes"] is None else int(fig["peak_rss_bytes"]),
        source=f"measured on {device}: {len(records)} run(s) at {sizes} {what_fitted}{note}", work=work.measures,
        assumed=work.assumed)


def record_run(workdir: Path, name: str, cfg: Any, *, material: Mapping[str, Any], work: Work,
               metrics: Mapping[str, float], measured: Mapping[str, Any], gpus: float) -> None:
    """Add what a finished stage measured to the calibration (nothing when its work is unknown)."""
    items = work[time_measure(name)]
    if not items:
        return
    device = device_kind(cfg.runtime)
    parts = {part: float(metrics[metric]) for part, (_, metric) in PARTS.get(name, {}).items() if metric in metrics}
    Calibration(workdir).add(name, calibration_key(name, cfg, material, device),
                             {"items": items, "work": work.measures, "parts": parts, "gpus": gpus,
                              "pid": os.getpid(), **{k: measured.get(k) for k in FIGURES}})


def format_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def format_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def one_line(e: StageEstimate) -> str:
    """`train: 1200 images seen, ~5 min, 0.00 GPU-h, disk 12.0 MB, peak RSS 1.2 GB (measured ...)`."""
    if e.cached:
        return f"{e.name}: cached (costs nothing)"
    work = "? items" if e.items is None else f"{e.items} {e.unit}"
    candidates = (e.work or {}).get("candidates")
    if candidates is not None:
        work += f" ({candidates:.0f} candidates{', assumed' if 'candidates' in e.assumed else ''})"
    if e.seconds is None:
        return f"{e.name}: {work}; no estimate ({e.source})"
    return (f"{e.name}: {work}, ~{format_seconds(e.seconds)}, {e.gpu_hours or 0.0:.2f} GPU-h, disk "
            f"{format_bytes(e.disk_bytes)}, peak RSS {format_bytes(e.peak_rss_bytes)} ({e.source})")
