"""COCO results files: the detections list the COCO server and pycocotools
read, written atomically, checked against the ground truth, and zipped for a
test-dev submission.

Format (cocodataset.org, "Results Format"): a JSON list of
`{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}`
with COCO's category ids and boxes in original-image pixels.
"""
from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ion.atomic import atomic_path, write_text_atomic
from ion.data.categories import CategoryMap
from ion.errors import UserError
from ion.evaluation.evaluator import flatten_detections
from ion.evaluation.ground_truth import GroundTruth, load_coco_dataset
from ion.inference.postprocess import Detections

# 0.01 px is far below annotation accuracy; 6 decimals tie only scores closer
# than 1e-6. Rounding makes the test-dev file (about 2M detections) ~40%
# smaller than float32 values written out in full.
BOX_DECIMALS = 2
SCORE_DECIMALS = 6
_REQUIRED_KEYS = ("image_id", "category_id", "bbox", "score")
_ALGORITHM_NAME = re.compile(r"^[A-Za-z0-9-]+$")
_SHOWN_IDS = 10


def to_coco_results(detections_per_image: Mapping[int, Detections], categories: CategoryMap) -> list[dict]:
    """Per-image detections (image id -> Detections with labels 1..K and xyxy
    boxes) -> COCO results dicts, in the mapping's order, boxes as xywh rounded
    to BOX_DECIMALS, scores to SCORE_DECIMALS, category ids COCO's."""
    image_ids, boxes_xywh, scores, category_ids = flatten_detections(detections_per_image, categories)
    boxes = np.round(boxes_xywh, BOX_DECIMALS).tolist()
    scores = np.round(scores, SCORE_DECIMALS).tolist()
    return [{"image_id": i, "category_id": c, "bbox": b, "score": s}
            for i, c, b, s in zip(image_ids.tolist(), category_ids.tolist(), boxes, scores)]


def write_results(path: Path, results: list[dict]) -> None:
    """Write the results JSON at `path` atomically (ion/atomic.py)."""
    write_text_atomic(path, json.dumps(results, separators=(",", ":")))


def validate_results(results: list, gt: GroundTruth, *, source: str = "results") -> None:
    """Raise a UserError unless every result has the four COCO fields, an
    image id of `gt` and a category id of `gt`. The message names `source`
    (e.g. the file), the offending ids (first 10 and how many) and the fix."""
    if not isinstance(results, list):
        raise UserError(f"{source}: expected a list of detections, got {type(results).__name__}")
    for n, r in enumerate(results):
        missing = [k for k in _REQUIRED_KEYS if not isinstance(r, dict) or k not in r]
        if missing:
            raise UserError(f"{source}: detection [{n}] lacks {missing}; each needs "
                            f"{list(_REQUIRED_KEYS)} with bbox = [x, y, w, h]")
        if len(r["bbox"]) != 4:
            raise UserError(f"{source}: detection [{n}] bbox has {len(r['bbox'])} numbers, expected [x, y, w, h]")
    dataset = load_coco_dataset(gt)
    problems = []
    for what, key, known in (("image", "image_id", {img["id"] for img in dataset["images"]}),
                             ("category", "category_id", {c["id"] for c in dataset["categories"]})):
        unknown = sorted({r[key] for r in results} - known)
        if unknown:
            problems.append(f"{len(unknown)} unknown {what} ids {unknown[:_SHOWN_IDS]}"
                            + (" ..." if len(unknown) > _SHOWN_IDS else ""))
    if problems:
        raise UserError(f"{source}: {'; '.join(problems)} (not in the ground truth: the detections belong to "
                        "another split or category set; rerun detect/evaluate on this split's annotations)")


def submission_name(*, algorithm: str, test_set: str = "test-dev2015") -> str:
    """`detections_<test_set>_<algorithm>_results`, the COCO server's naming
    (`[type]_[testset]_[alg]_results.json`, zipped); underscores separate the
    fields, so the algorithm name may not contain any."""
    if not _ALGORITHM_NAME.match(algorithm):
        raise UserError(f"algorithm name {algorithm!r}: use letters, digits and '-' only; it becomes the <alg> "
                        f"field of detections_{test_set}_<alg>_results.json (set evaluate.algorithm)")
    return f"detections_{test_set}_{algorithm}_results"


def write_submission_zip(out_dir: Path, results: list[dict], *, algorithm: str,
                         test_set: str = "test-dev2015") -> Path:
    """Write `<out_dir>/detections_<test_set>_<alg>_results.zip` holding the
    results as `detections_<test_set>_<alg>_results.json`, atomically. Returns the zip's path."""
    name = submission_name(algorithm=algorithm, test_set=test_set)
    path = Path(out_dir) / f"{name}.zip"
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"{name}.json", json.dumps(results, separators=(",", ":")))
    return path
