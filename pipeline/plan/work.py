"""What each stage's cost grows with: its work, in measures counted from the config, the split
sizes and, once detect has run, its candidate counts.

    data       images          the three splits (parsed, checked or generated)
    proposals  images          RPN, bottom-up boxes, mix and recall per image, plus a part:
               rpn_images_seen the RPN's training, iterations x proposals.rpn.images_per_batch
    train      images_seen     the phases' iterations x train.images_per_batch
    detect     image_passes    images of detect.splits (at most detect.max_images), twice with flip;
                               its disk grows with the candidates it keeps
    tune       trial_candidates trials x minival candidates (every trial post-processes them all)
    evaluate   candidates      the evaluate split's candidates

A candidate count is the trained model's doing (every class score >= detect.score_thresh is
kept), not the image count's: a model that has barely learned keeps 10-20x more per image than
a trained one. So tune, evaluate and detect's disk take the count from detect's output when it
exists, and otherwise assume the candidates per image that the calibration's detect runs kept,
and say so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

# The measure that a stage's time, disk and peak memory grow with (disk and memory: where not the time's).
TIME_BY = {"data": "images", "proposals": "images", "train": "images_seen", "detect": "image_passes",
           "tune": "trial_candidates", "evaluate": "candidates"}
DISK_BY = {"detect": "candidates", "tune": "trials"}
# Peak memory grows only where a process holds a whole split: the data stage its annotation JSON
# (fitted), each tune worker minival's candidates (a known size: RSS_PER_ITEM). Every other stage
# streams, so its peak is flat in the work.
RSS_BY = {"data": "images", "tune": "candidates"}
# Bytes a process holds per item of its measure, on top of its measured baseline: a candidate read
# for tuning is a float32 box (16), a float32 score (4) and an int64 label (8).
RSS_PER_ITEM = {"tune": 28.0}
# What a stage's work is shown as (its items), where not the time's measure.
SHOWN_BY = {"tune": "trial_images", "evaluate": "images"}
UNITS = {"images": "images", "images_seen": "images seen", "image_passes": "image passes",
         "trial_images": "trial images", "trial_candidates": "trial candidates", "candidates": "candidates"}
# Parts of a stage timed on their own (record's "parts"): name -> (measure, the stage metric with its seconds).
PARTS = {"proposals": {"rpn_training": ("rpn_images_seen", "rpn_train_s")}}
CANDIDATES_METRIC = "_candidates_per_image"  # detect's metrics: <split>_candidates_per_image


@dataclass(frozen=True)
class Work:
    """A stage's measures (None: not known yet) and which of them were assumed, not counted."""

    measures: dict[str, float | None]
    assumed: tuple[str, ...] = field(default=())

    def __getitem__(self, measure: str) -> float | None:
        return self.measures.get(measure)


def detect_candidates(detect_metrics: Mapping[str, float] | None) -> dict[str, float] | None:
    """{split: candidates per image} from detect's metrics (None when detect has not run)."""
    if not detect_metrics:
        return None
    found = {k[: -len(CANDIDATES_METRIC)]: float(v) for k, v in detect_metrics.items()
             if k.endswith(CANDIDATES_METRIC)}
    return found or None


def uses_rpn(pcfg: Any) -> bool:
    sources = set(pcfg.resolve_mix("train")) | set(pcfg.resolve_mix("test")) | set(pcfg.bottom_up_sources())
    return any(s.startswith("rpn") for s in sources)


def stage_work(name: str, cfg: Any, counts: Mapping[str, int] | None, *,
               candidates: Mapping[str, float] | None = None,
               assumed_candidates: float | None = None) -> Work:
    """The work of stage `name` for split sizes `counts` (None: not counted yet); `candidates`:
    detect's candidates per image and split when it has run, else `assumed_candidates` per image."""
    if not hasattr(cfg, name):
        return Work({})
    if name == "train":
        return Work({"images_seen": float(sum(p.iterations for p in cfg.train.phases) * cfg.train.images_per_batch)})
    if name == "proposals":
        rpn = cfg.proposals.rpn
        part = float(rpn.iterations * rpn.images_per_batch) if uses_rpn(cfg.proposals) else 0.0
        return Work({"images": None if counts is None else float(sum(counts.values())), "rpn_images_seen": part})
    if counts is None:
        return Work({TIME_BY.get(name, "images"): None})
    if name == "data":
        return Work({"images": float(sum(counts.values()))})

    assumed: list[str] = []

    def candidates_of(split: str, images: float) -> float | None:
        if candidates is not None and split in candidates:
            return images * candidates[split]
        if assumed_candidates is None:
            return None
        assumed.append("candidates")
        cap = getattr(getattr(cfg, "detect", None), "max_candidates", None)
        return images * (assumed_candidates if cap is None else min(assumed_candidates, float(cap)))

    if name == "detect":
        cap = cfg.detect.max_images
        per_split = {s: float(min(counts.get(s, 0), cap) if cap else counts.get(s, 0)) for s in cfg.detect.splits}
        found = [candidates_of(s, n) for s, n in per_split.items()]
        return Work({"image_passes": sum(per_split.values()) * (2 if cfg.detect.flip else 1),
                     "images": sum(per_split.values()),
                     "candidates": None if None in found else sum(found)}, tuple(dict.fromkeys(assumed)))
    if name == "tune":
        trials, found = float(cfg.tune.trials), candidates_of("minival", float(counts.get("minival", 0)))
        return Work({"trials": trials, "trial_images": trials * counts.get("minival", 0), "candidates": found,
                     "trial_candidates": None if found is None else trials * found}, tuple(dict.fromkeys(assumed)))
    if name == "evaluate":
        split = cfg.evaluate.split
        return Work({"images": float(counts.get(split, 0)),
                     "candidates": candidates_of(split, float(counts.get(split, 0)))}, tuple(dict.fromkeys(assumed)))
    return Work({})


def measured_work(name: str, cfg: Any, counts: Mapping[str, int] | None, metrics: Mapping[str, float],
                  detect_metrics: Mapping[str, float] | None) -> Work:
    """What a finished stage did: its planned work with the parts it actually ran (an RPN resumed
    half-way trained only the rest) and detect's real candidate counts."""
    own = metrics if name == "detect" else detect_metrics
    work = stage_work(name, cfg, counts, candidates=detect_candidates(own))
    if name == "proposals":
        rpn = cfg.proposals.rpn
        done = metrics.get("rpn_iterations", 0.0) - metrics.get("rpn_started_at", 0.0) if "rpn_train_s" in metrics \
            else 0.0  # rpn.pt was there already: no training in this run
        work = Work({**work.measures, "rpn_images_seen": float(done * rpn.images_per_batch)})
    return work


def time_measure(name: str) -> str:
    return TIME_BY.get(name, "images")


def figure_measure(name: str, figure: str) -> str:
    table = {"seconds": TIME_BY, "disk_bytes": DISK_BY, "peak_rss_bytes": RSS_BY}[figure]
    return table.get(name, time_measure(name))


def flat_memory(name: str) -> bool:
    """Whether the stage's peak RSS is flat in its work (streamed: RSS_BY)."""
    return name not in RSS_BY


def shown_measure(name: str) -> str:
    return SHOWN_BY.get(name, time_measure(name))


def unit_of(measure: str) -> str:
    return UNITS.get(measure, "items")
