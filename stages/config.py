"""Config sections of the stages after training: detect, tune, evaluate (the
train section is in stages/train_config.py).

Field conventions (docs/CONTRACTS.md): frozen dataclasses, every field has a
default and a one-line `help`; `min`/`max` are inclusive bounds checked by the
loader in pipeline/config/__init__.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

__all__ = ["DetectConfig", "EvaluateConfig", "TuneConfig"]


@dataclass(frozen=True)
class DetectConfig:
    splits: tuple[str, ...] = field(
        default=("minival", "test"),
        metadata={"help": "splits to run the detector on: minival feeds tune, test feeds evaluate"})
    flip: bool = field(
        default=True,
        metadata={"help": "also run the left-right flipped image and store the flip-merged candidates "
                          "(Appendix, post-competition item 2); unflipped candidates are always stored"})
    score_thresh: float = field(
        default=0.05, metadata={"help": "candidates below this class score are not stored", "min": 0.0, "max": 1.0})
    two_rounds: bool = field(
        default=True,
        metadata={"help": "score and regress the regressed boxes a second time (Sec. 4.2, Appendix item 5)"})
    # Default top_class: one re-scored ROI per proposal, as cheap as round 1. The
    # paper follows MR-CNN, which re-scores every class's box (all_classes).
    round2: Literal["top_class", "all_classes"] = field(
        default="top_class",
        metadata={"help": "round 2 re-scores each proposal's top-class box (top_class: one ROI per proposal) "
                          "or every class's box above score_thresh (all_classes: MR-CNN's iterative "
                          "localisation, which the paper follows)"})
    images_per_task: int = field(
        default=16, metadata={"help": "images per Ray task; a killed run keeps finished tasks", "min": 1})
    amp: Literal["off", "bf16", "fp16"] = field(
        default="off",
        metadata={"help": "autocast dtype of the detector's passes on a GPU (scores and deltas decoded in "
                          "float32); ignored on the CPU"})
    max_images: Optional[int] = field(
        default=None, metadata={"help": "detect only the first N images of each split (debugging)", "min": 1})
    # A barely trained model scores every class of every ROI alike: all 4000 x 80 x 2 rounds pass
    # score_thresh or none does, so the candidate count, detect's disk and the work of tune and
    # evaluate follow the model, not the images. A cap bounds them.
    max_candidates: Optional[int] = field(
        default=None, metadata={"help": "keep at most this many candidates per image and set, the highest "
                                        "scores (none: every one >= score_thresh)", "min": 1})


@dataclass(frozen=True)
class TuneConfig:
    sampler: Literal["random", "sobol", "tpe"] = field(
        default="random",
        metadata={"help": "Optuna sampler; the paper: 'randomly sampling hundreds of thresholds'"})
    trials: int = field(default=200, metadata={"help": "total trials in the study (a rerun adds none once reached)",
                                                "min": 1})
    parallel: int = field(default=2, metadata={"help": "trials evaluated at once as Ray tasks", "min": 1})
    nms_iou: tuple[float, float] = field(
        default=(0.2, 0.8), metadata={"help": "search range of the NMS IoU threshold", "min": 0.0, "max": 1.0})
    vote_iou: tuple[float, float] = field(
        default=(0.5, 1.0), metadata={"help": "search range of the weighted-voting IoU threshold "
                                             "(1.0 = a box only votes with itself: voting off)",
                                      "min": 0.0, "max": 1.0})
    tune_score_thresh: bool = field(
        default=False, metadata={"help": "also search the score threshold in score_thresh_range"})
    score_thresh_range: tuple[float, float] = field(
        default=(0.05, 0.3), metadata={"help": "search range of the score threshold", "min": 0.0, "max": 1.0})
    tune_max_dets: bool = field(
        default=False, metadata={"help": "also search the detections kept per image among max_dets_choices"})
    max_dets_choices: tuple[int, ...] = field(
        default=(50, 100), metadata={"help": "choices for detections per image", "min": 1})
    baseline_nms_iou: float = field(
        default=0.3, metadata={"help": "plain NMS threshold of the untuned baseline (the paper's 0.3)",
                               "min": 0.0, "max": 1.0})
    use_flip: bool = field(
        default=True, metadata={"help": "tune on the flip-merged candidates (when detect stored them)"})


@dataclass(frozen=True)
class EvaluateConfig:
    split: str = field(default="test", metadata={"help": "split the tuned thresholds are applied to"})
    draw_images: int = field(
        default=6, metadata={"help": "test images drawn with their detections into plots/", "min": 0})
    algorithm: str = field(
        default="ion", metadata={"help": "algorithm name in the COCO server's results file name"})
    context_ap: bool = field(
        default=True, metadata={"help": "report AP over the dataset's context classes when it names them"})
    voc_metric: bool = field(
        default=False,
        metadata={"help": "also report the VOC devkit's mAP (VOC07 11-point and VOC10+ all-point, IoU > 0.5) "
                          "for every setting; always on when the data source is voc"})
