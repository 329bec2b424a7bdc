"""Ground truth for evaluation, from whatever the caller holds: a COCO json
path, its loaded dict, or a pycocotools `COCO` object."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Union

from pycocotools.coco import COCO

from ion.errors import UserError

GroundTruth = Union[str, Path, dict, COCO]


def load_coco_dataset(gt: GroundTruth) -> dict[str, Any]:
    """The COCO-format dict (images, annotations, categories) of `gt`."""
    if isinstance(gt, COCO):
        return gt.dataset
    if isinstance(gt, dict):
        return gt
    path = Path(gt)
    try:
        with open(path) as f:
            dataset = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: ground-truth annotation file not found (rerun the data stage)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); rerun the data stage to rewrite it") from None
    for key in ("images", "categories"):
        if key not in dataset:
            raise UserError(f"{path}: no '{key}' list: not a COCO annotation file (rerun the data stage)")
    # An image-info file (test-dev) has no annotations: ids are still checked against it.
    dataset.setdefault("annotations", [])
    return dataset


def load_coco(gt: GroundTruth) -> COCO:
    """A pycocotools `COCO` index of `gt`, built without its progress prints."""
    if isinstance(gt, COCO):
        return gt
    coco = COCO()
    coco.dataset = load_coco_dataset(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
