"""The threshold-tuning objective (Appendix item 5): "evaluating all boxes once
and then randomly sampling hundreds of thresholds" for NMS and weighted voting,
scored by COCO AP@[.5:.95] on minival.

One trial = `postprocess` on every image's cached raw candidates with the
trial's thresholds, then the fast `Evaluator` (built once from the minival
ground truth). No network run, no Optuna or Ray here: stages/tune.py samples
the thresholds and spreads trials over workers.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ion.evaluation.evaluator import Evaluator
from ion.inference.postprocess import Detections, postprocess


@dataclass(frozen=True)
class Thresholds:
    """The test-time thresholds one trial applies (Sec. 4.1, Appendix item 5)."""

    nms_iou: float = field(metadata={"help": "per-class NMS IoU threshold (the paper's tuned value: 0.443)"})
    vote_iou: float | None = field(
        default=None, metadata={"help": "weighted-voting IoU threshold (tuned: 0.854); None: no voting"})
    score_thresh: float = field(default=0.05, metadata={"help": "candidates below this score are dropped"})
    max_dets: int = field(default=100, metadata={"help": "detections kept per image"})


def apply_thresholds(raw_per_image: Mapping[int, Detections], *, nms_iou: float, vote_iou: float | None,
                     score_thresh: float = 0.05, max_dets: int = 100) -> dict[int, Detections]:
    """`postprocess` every image's raw candidates (image id -> Detections,
    numpy or torch) with one set of thresholds; image id -> Detections, same order."""
    return {image_id: postprocess(raw.boxes, raw.scores, raw.labels, nms_iou=nms_iou, vote_iou=vote_iou,
                                  score_thresh=score_thresh, max_dets=max_dets)
            for image_id, raw in raw_per_image.items()}


def objective(evaluator: Evaluator, raw_per_image: Mapping[int, Detections],
              params: Thresholds | Mapping[str, float]) -> float:
    """COCO AP@[.5:.95] of the raw candidates post-processed with `params`
    (a Thresholds, or a dict of its fields such as an Optuna trial's params)."""
    if not isinstance(params, Thresholds):
        params = Thresholds(**params)
    dets = apply_thresholds(raw_per_image, nms_iou=params.nms_iou, vote_iou=params.vote_iou,
                            score_thresh=params.score_thresh, max_dets=params.max_dets)
    return evaluator.evaluate(dets).stats["AP"]
