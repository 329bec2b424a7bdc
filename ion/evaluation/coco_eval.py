"""COCO box evaluation with pycocotools, the reference every other evaluator
in the project is checked against."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Union

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ion.errors import UserError
from ion.evaluation.ground_truth import GroundTruth, load_coco
from ion.evaluation.metrics import STAT_NAMES, CocoMetrics

Results = Union[str, Path, list]


def coco_eval(gt: GroundTruth, detections: Results) -> CocoMetrics:
    """pycocotools' COCOeval (iouType "bbox") of `detections` against `gt`,
    quietly. `detections`: COCO results (a list of {"image_id", "category_id",
    "bbox": [x, y, w, h], "score"}) or the path of a results JSON. The caller's
    list is not modified (loadRes writes into the dicts it gets). Detections of
    categories absent from `gt` are ignored, as pycocotools does; unknown image
    ids raise a UserError (pycocotools would assert).
    """
    coco_gt = load_coco(gt)
    results = _load_results(detections)
    unknown = sorted({r["image_id"] for r in results} - set(coco_gt.getImgIds()))
    if unknown:
        raise UserError(f"{_name(detections)}: {len(unknown)} image ids are not in the ground truth, "
                        f"e.g. {unknown[:10]} (evaluate against the annotations of the split they came from)")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r) for r in results]) if results else _empty_results(coco_gt)
        evaluation = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    metrics = CocoMetrics.from_arrays(precision=evaluation.eval["precision"], recall=evaluation.eval["recall"],
                                      category_ids=evaluation.params.catIds)
    # The stats are pycocotools' own (the reference), not recomputed.
    stats = dict(zip(STAT_NAMES, (float(s) for s in evaluation.stats)))
    return CocoMetrics(stats=stats, per_category_ap=metrics.per_category_ap,
                       per_size_ap={"small": stats["APs"], "medium": stats["APm"], "large": stats["APl"]},
                       precision=metrics.precision, recall=metrics.recall, category_ids=metrics.category_ids)


def _load_results(detections: Results) -> list:
    if isinstance(detections, list):
        return detections
    path = Path(detections)
    try:
        with open(path) as f:
            results = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: results file not found (rerun the evaluate stage)") from None
    if not isinstance(results, list):
        raise UserError(f"{path}: expected a JSON list of detections, got {type(results).__name__}")
    return results


def _empty_results(coco_gt: COCO) -> COCO:
    # loadRes cannot take an empty list (it looks at the first result's keys).
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]),
                       "categories": list(coco_gt.dataset["categories"]), "annotations": []}
    coco_dt.createIndex()
    return coco_dt


def _name(detections: Results) -> str:
    return "detections" if isinstance(detections, list) else str(detections)
