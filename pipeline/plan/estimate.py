"""Each stage's cost: its work in items, and time, disk and peak memory from a calibration.

Work per stage (what its cost grows with):
  data       images of the three splits (parsed, checked or generated)
  proposals  images of the three splits (RPN, bottom-up boxes, mix, recall; the RPN's
             training is a fixed part)
  train      images seen: the phases' iterations x train.images_per_batch
  detect     images of detect.splits (at most detect.max_images each), twice with flip
  tune       trials x minival images
  evaluate   images of evaluate.split

The calibration is what earlier runs of the same stage measured on the same device kind: every
finished stage records (items, seconds, disk bytes, peak RSS) under a key of its code, its
config without the data set's size and paths (data.source only) and without the counts above,
and the device kind. One record gives per-item figures; two or more at different sizes give a
fixed part plus a per-item part (least squares), so the start-up of Ray and of the model is not
multiplied by the image count.
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

CALIBRATION_DIR = "calibration"
MAX_RECORDS = 8  # per stage and key: the most recent sizes
FIGURES = ("seconds", "disk_bytes", "peak_rss_bytes")
# Config fields that only say how much work there is (the item counts above): not in the key.
_COUNT_FIELDS = {"train": ("phases", "iterations"), "tune": ("trials",), "detect": ("max_images",)}


@dataclass(frozen=True)
class StageEstimate:
    name: str
    items: int | None
    unit: str
    cached: bool
    seconds: float | None = None
    gpu_hours: float | None = None
    disk_bytes: int | None = None
    peak_rss_bytes: int | None = None
    source: str = "no calibration"  # "measured: N runs (items ...)" or why there is no figure

    def as_json(self) -> dict[str, Any]:
        return {"items": self.items, "seconds": self.seconds, "gpu_hours": self.gpu_hours,
                "disk_bytes": self.disk_bytes, "peak_rss_bytes": self.peak_rss_bytes, "cached": self.cached}


def stage_items(name: str, cfg: Any, counts: Mapping[str, int] | None) -> tuple[int | None, str]:
    """(items, unit) of a stage's work for split sizes `counts` (None: unknown yet, or a config
    without the stage's section)."""
    if not hasattr(cfg, name):
        return None, "items"
    if name == "train":
        return sum(p.iterations for p in cfg.train.phases) * cfg.train.images_per_batch, "images seen"
    if counts is None:
        return None, "images"
    if name in ("data", "proposals"):
        return sum(counts.values()), "images"
    if name == "detect":
        cap = cfg.detect.max_images
        images = sum(min(counts.get(s, 0), cap) if cap else counts.get(s, 0) for s in cfg.detect.splits)
        return images * (2 if cfg.detect.flip else 1), "image passes"
    if name == "tune":
        return cfg.tune.trials * counts.get("minival", 0), "trial images"
    if name == "evaluate":
        return counts.get(cfg.evaluate.split, 0), "images"
    return None, "items"


def device_kind(runtime: Any) -> str:
    """What a calibration is valid for: the GPU's name, or cpu."""
    if getattr(runtime, "device", "cpu") != "cpu":
        import torch

        if torch.cuda.is_available():
            return f"cuda:{torch.cuda.get_device_name(0)}"
    return "cpu"


def _drop_counts(section: str, value: Any) -> Any:
    path = _COUNT_FIELDS.get(section)
    if not path or not isinstance(value, dict):
        return value
    value = dict(value)
    if len(path) == 1:
        value.pop(path[0], None)
    else:
        value[path[0]] = [{k: v for k, v in item.items() if k != path[1]} for item in value.get(path[0], [])]
    return value


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


def predict(records: list[dict[str, Any]], items: int) -> dict[str, float | None]:
    """seconds, disk_bytes, peak_rss_bytes and gpus for `items` from the records."""
    out: dict[str, float | None] = {}
    for figure in FIGURES:
        points = [(float(r["items"]), float(r[figure])) for r in records if r.get(figure) is not None]
        if not points:
            out[figure] = None
            continue
        fixed, per_item = _fit(points, flat=figure == "peak_rss_bytes")
        out[figure] = fixed + per_item * items
    out["gpus"] = max((float(r.get("gpus", 0)) for r in records), default=0.0)
    return out


def estimate_stage(name: str, cfg: Any, *, material: Mapping[str, Any], counts: Mapping[str, int] | None,
                   cached: bool, calibration: Calibration, device: str) -> StageEstimate:
    items, unit = stage_items(name, cfg, counts)
    if cached:
        return StageEstimate(name, items, unit, cached=True, seconds=0.0, gpu_hours=0.0, disk_bytes=0,
                             peak_rss_bytes=0, source="cached: costs nothing")
    records = calibration.records(name, calibration_key(name, cfg, material, device))
    if items is None:
        return StageEstimate(name, None, unit, cached=False, source="work unknown until the data stage's "
                                                                     "inputs can be read")
    if not records:
        return StageEstimate(name, items, unit, cached=False,
                             source=f"assumed: no calibration for this model on {device} yet (any run records one)")
    fig = predict(records, items)
    sizes = ", ".join(str(r["items"]) for r in records)
    seconds = fig["seconds"]
    return StageEstimate(
        name, items, unit, cached=False, seconds=seconds,
        gpu_hours=None if seconds is None else seconds * float(fig["gpus"] or 0.0) / 3600.0,
        disk_bytes=None if fig["disk_bytes"] is None else int(fig["disk_bytes"]),
        peak_rss_bytes=None if fig["peak_rss_bytes"] is None else int(fig["peak_rss_bytes"]),
        source=f"measured on {device}: {len(records)} run(s) at {sizes} {unit}")


def record_run(workdir: Path, name: str, cfg: Any, *, material: Mapping[str, Any],
               counts: Mapping[str, int] | None, measured: Mapping[str, Any], gpus: float) -> None:
    """Add what a finished stage measured to the calibration (nothing when its work is unknown)."""
    items, _ = stage_items(name, cfg, counts)
    if not items:
        return
    device = device_kind(cfg.runtime)
    Calibration(workdir).add(name, calibration_key(name, cfg, material, device),
                             {"items": items, "gpus": gpus, "pid": os.getpid(),
                              **{k: measured.get(k) for k in FIGURES}})


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
    if e.seconds is None:
        return f"{e.name}: {work}; no estimate ({e.source})"
    return (f"{e.name}: {work}, ~{format_seconds(e.seconds)}, {e.gpu_hours or 0.0:.2f} GPU-h, disk "
            f"{format_bytes(e.disk_bytes)}, peak RSS {format_bytes(e.peak_rss_bytes)} ({e.source})")
