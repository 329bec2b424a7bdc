"""Detection on any images with a trained pipeline's model, exactly as the
evaluate stage scores the test split: the test proposal mix computed on the
fly (RPN1/RPN2 from the proposals stage's rpn.pt, selective search; MCG needs
precomputed files, so it cannot be), mixed as `proposals.mix.test`; flip TTA
and two regression rounds as `detect` says (ion/inference/predict.py); the
tuned NMS / voting thresholds applied as evaluate applies them.

Not a pipeline stage (graph.STAGE_NAMES does not list it): `python -m pipeline
predict` (pipeline/commands/predict.py) and the MLflow model
(pipeline/tracking/model.py) call it. Per-image work is `predict_task`, a
module-level function a Ray task runs; the model is loaded once per worker.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from ion.data.categories import CategoryMap
from ion.data.images import decode_image
from ion.errors import UserError
from ion.evaluation.results import to_coco_results
from ion.inference.postprocess import Detections
from ion.inference.predict import predict_raw
from ion.inference.tuning import apply_thresholds
from proposals.mix import mix_image
from proposals.rpn.config import RpnConfig
from proposals.rpn.generate import generate_proposals_all
from proposals.rpn.model import VARIANTS, load_rpn
from proposals.selective_search import selective_search_isolated
from stages.helpers.worker_cache import cached, worker_device
from stages.train import MODEL_FILE, load_trained_detector

RPN_FILE = "rpn.pt"
THRESHOLDS_FILE = "best.json"
DRAW_COLOUR = (230, 30, 30)
COMPUTABLE = (*VARIANTS, "selective_search")  # sources new images can get; MCG needs its .mat files


@dataclass(frozen=True)
class Predictor:
    """Everything a worker needs to detect objects in one image (picklable)."""

    model_dir: str  # model.json + its weights (a train stage output, or an MLflow model's artifacts)
    rpn_weights: Optional[str]
    rpn: Optional[RpnConfig]
    mix: tuple[tuple[str, int], ...]  # (source, top-k) in mix order
    dedup_iou: float
    selective_search: Optional[dict]
    flip: bool
    two_rounds: bool
    round2: str  # detect.round2
    amp: str  # detect.amp, applied only where the detector runs on a GPU
    candidate_thresh: float  # detect.score_thresh: candidates kept before NMS
    thresholds: dict  # nms_iou, vote_iou, score_thresh, max_dets (ion.inference.tuning.apply_thresholds)


def thresholds_from(best: Optional[dict], tune_cfg) -> dict:
    """The tune stage's best.json thresholds, or the untuned baseline (plain NMS at
    tune.baseline_nms_iou, no voting) when there is none."""
    if best is None:
        return {"nms_iou": tune_cfg.baseline_nms_iou, "vote_iou": None, "score_thresh": 0.05, "max_dets": 100}
    return {k: best[k] for k in ("nms_iou", "vote_iou", "score_thresh", "max_dets")}


def make_predictor(cfg, *, model_dir: Path, rpn_weights: Optional[Path], best: Optional[dict]
                   ) -> tuple[Predictor, list[str]]:
    """The Predictor of `cfg` and notes for the user (a source of the test mix left out).

    UserError when no source of the test mix can be computed for new images."""
    mix = cfg.proposals.resolve_mix("test")
    notes = []
    dropped = [s for s in mix if s not in COMPUTABLE]
    kept = {s: k for s, k in mix.items() if s in COMPUTABLE}
    if dropped and not kept:
        raise UserError(f"proposals.mix.test uses only {', '.join(dropped)}, which need precomputed files and "
                        "cannot be computed for new images; predict needs rpn1, rpn2 or selective_search in the "
                        "test mix (e.g. -o proposals.bottom_up=selective_search)")
    if dropped:
        notes.append(f"note: proposals.mix.test names {', '.join(dropped)} (precomputed files only): new images "
                     f"get {', '.join(f'{s} {k}' for s, k in kept.items())} instead")
    uses_rpn = any(s in VARIANTS for s in kept)
    if uses_rpn and (rpn_weights is None or not Path(rpn_weights).is_file()):
        raise UserError(f"{rpn_weights}: the RPN weights are missing; rerun the proposals stage "
                        "(python -m pipeline run --stages proposals --force)")
    ss = cfg.proposals.selective_search
    ss_settings = (dict(mode=ss.mode, k=ss.k, k_step=ss.k_step, sigma=ss.sigma, min_size=ss.min_size,
                        max_boxes=ss.max_boxes, resize_max=ss.resize_max) if "selective_search" in kept else None)
    if best is None:
        notes.append(f"note: no tuned thresholds: plain NMS at tune.baseline_nms_iou "
                     f"{cfg.tune.baseline_nms_iou}, no voting")
    predictor = Predictor(model_dir=str(model_dir), rpn_weights=str(rpn_weights) if uses_rpn else None,
                          rpn=cfg.proposals.rpn if uses_rpn else None, mix=tuple(kept.items()),
                          dedup_iou=cfg.proposals.mix.dedup_iou, selective_search=ss_settings,
                          flip=cfg.detect.flip, two_rounds=cfg.detect.two_rounds, round2=cfg.detect.round2,
                          amp=cfg.detect.amp, candidate_thresh=cfg.detect.score_thresh,
                          thresholds=thresholds_from(best, cfg.tune))
    return predictor, notes


def categories_of(model_dir: Path) -> CategoryMap:
    spec = json.loads((Path(model_dir) / MODEL_FILE).read_text(encoding="utf-8"))
    return CategoryMap(ids=tuple(spec["category_ids"]), names=tuple(spec["category_names"]))


# ----------------------------------------------------------------------------- per image


def _models(p: Predictor):
    device = worker_device()
    detector, model_cfg = cached("predict-detector", p.model_dir,
                                 lambda: load_trained_detector(Path(p.model_dir), device=device))
    rpn = None
    if p.rpn_weights is not None:
        rpn = cached("predict-rpn", p.rpn_weights,
                     lambda: load_rpn(Path(p.rpn_weights), p.rpn).to(device))
    categories = cached("predict-categories", p.model_dir, lambda: categories_of(Path(p.model_dir)))
    return detector, model_cfg, rpn, categories


def proposals_for(p: Predictor, image: np.ndarray, rpn, *, seed: int) -> np.ndarray:
    """float32 (P, 4) xyxy: the test mix of `image`, computed (module docstring)."""
    per_source: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if rpn is not None:
        with torch.inference_mode():
            per_source.update(generate_proposals_all(rpn, image, p.rpn))
    if p.selective_search is not None:
        per_source["selective_search"] = selective_search_isolated(image, seed=seed, **p.selective_search)
    sources = [s for s, _ in p.mix]
    boxes, _, _ = mix_image([per_source[s] for s in sources], [k for _, k in p.mix], dedup_iou=p.dedup_iou)
    return boxes


def detect_image(p: Predictor, image: np.ndarray, *, seed: int = 0) -> Detections:
    """Final detections of one uint8 (H, W, 3) RGB image: boxes float32 (D, 4) xyxy,
    scores (D,), labels (D,) in 1..K."""
    detector, model_cfg, rpn, _ = _models(p)
    boxes = proposals_for(p, image, rpn, seed=seed)
    amp = p.amp if next(detector.parameters()).device.type == "cuda" else "off"
    raw = predict_raw(detector, image, boxes, min_size=model_cfg.input.min_size,
                      max_size=model_cfg.input.max_size, flip=p.flip, score_thresh=p.candidate_thresh,
                      two_rounds=p.two_rounds, round2=p.round2, amp=amp)
    chosen = raw["flip" if p.flip else "plain"]  # evaluate's final setting
    candidates = Detections(chosen["boxes"], chosen["scores"], chosen["labels"].astype(np.int64))
    return apply_thresholds({0: candidates}, **p.thresholds)[0]


def draw(image: np.ndarray, dets: Detections, categories: CategoryMap, *, threshold: float) -> Image.Image:
    """`image` with the detections scoring >= threshold: a box and `name score` each."""
    picture = Image.fromarray(image)
    pen = ImageDraw.Draw(picture)
    for box, score, label in zip(np.asarray(dets.boxes), np.asarray(dets.scores), np.asarray(dets.labels)):
        if score < threshold:
            continue
        x1, y1, x2, y2 = (float(v) for v in box)
        pen.rectangle((x1, y1, x2, y2), outline=DRAW_COLOUR, width=2)
        text = f"{categories.name(categories.category_id(int(label)))} {score:.2f}"
        left, top, right, bottom = pen.textbbox((x1, y1), text)
        pen.rectangle((left, top, right, bottom), fill=DRAW_COLOUR)
        pen.text((x1, y1), text, fill=(255, 255, 255))
    return picture


@dataclass(frozen=True)
class PredictTask:
    """One Ray task: a few images, sent as their bytes, so a worker on another node needs no
    view of the driver's disk. images: (image_id, name, file bytes); draw: return a drawn JPEG."""

    predictor: Predictor
    images: tuple[tuple[int, str, bytes], ...]
    draw_threshold: float
    draw: bool = True


def predict_task(task: PredictTask) -> list[dict[str, Any]]:
    """A Ray task: detect and draw; one entry per image: {"image_id", "file_name", "width",
    "height", "results": COCO results dicts, "drawn": JPEG bytes or None}, or {"image_id",
    "file_name", "error"} for an image that cannot be read (truncated, not an image): one bad
    file costs only itself, never the other images' detections."""
    if worker_device().type == "cpu":
        torch.set_num_threads(1)  # one task per core: Ray's tasks are the parallelism
    _, _, _, categories = _models(task.predictor)
    entries = []
    for image_id, name, data in task.images:
        try:
            image = decode_image(data, name=name)  # EXIF orientation applied: no annotation to agree with
        except UserError as err:
            entries.append({"image_id": image_id, "file_name": name, "error": str(err)})
            continue
        dets = detect_image(task.predictor, image, seed=image_id)
        drawn = None
        if task.draw:
            buffer = io.BytesIO()
            draw(image, dets, categories, threshold=task.draw_threshold).save(buffer, format="JPEG", quality=90)
            drawn = buffer.getvalue()
        results = to_coco_results({image_id: dets}, categories)
        for entry in results:
            entry["file_name"] = name
        entries.append({"image_id": image_id, "file_name": name, "width": int(image.shape[1]),
                        "height": int(image.shape[0]), "results": results, "drawn": drawn})
    return entries
