"""The data stage's splits as the rest of the project reads them (docs/CONTRACTS.md, "Data stage outputs").

    split = DetectionSplit.load(data_dir, "train")
    for record in split.images:
        image = record.load()                  # uint8 (H, W, 3) RGB, EXIF handled as the annotations expect
        masks = instance_masks(record)         # bool (G, H, W)

    split = DetectionSplit.load(data_dir, "test", with_annotations=False)   # id, path, size only
    split = DetectionSplit.load(data_dir, "train", with_masks=False)        # boxes, no segmentations
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import torch

from ion.data.categories import CONTEXT_IDS_KEY, CategoryMap
from ion.data.coco import segmentation_to_rle
from ion.data.images import load_image
from ion.errors import UserError
from ion.ops.box_ops import box_xywh_to_xyxy

__all__ = ["DetectionSplit", "ImageRecord", "instance_masks", "load_image", "INDEX_FILE", "CONTEXT_IDS_KEY"]

INDEX_FILE = "index.json"
_FIX = "rerun the data stage: python -m pipeline run --stages data --force"


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """One image and its ground truth (G boxes; crowd boxes included, flagged by `iscrowd`).
    Loaded `with_annotations=False`, the four ground-truth fields are None."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray | None  # float32 (G, 4) [x1, y1, x2, y2]
    category_ids: np.ndarray | None  # int64 (G,) COCO ids
    iscrowd: np.ndarray | None  # bool (G,)
    segmentations: list | None  # G COCO polygons lists / RLE dicts (None: loaded without masks)

    def load(self) -> np.ndarray:
        """The image, uint8 (H, W, 3) RGB, in the pixel layout its annotations refer to."""
        return load_image(self.path, expected_size=(self.width, self.height))


@dataclass(frozen=True, eq=False)
class DetectionSplit:
    """A split written by the data stage: its images, categories and COCO annotation file."""

    name: str
    images: list[ImageRecord]
    categories: CategoryMap
    annotation_file: Path  # the COCO json, for pycocotools
    image_dir: Path
    has_annotations: bool  # False for test-dev (detections go to the COCO server)
    context_category_ids: tuple[int, ...]  # empty for real COCO
    source: str = ""  # the data stage's source: "synthetic", "coco" or "voc" ("" from older outputs)

    @classmethod
    def load(cls, data_dir: Path, split: str, *, with_annotations: bool = True,
             with_masks: bool = True) -> DetectionSplit:
        """Read `split` ("train", "minival", "test") from the data stage's output folder.
        `with_annotations` False: records with id, path and size only (no per-image
        ground truth built), for consumers that only read images; `with_masks` False:
        boxes, classes and crowd flags without the segmentations (None), which are
        dropped while the json is parsed: on COCO the polygons are most of the file
        and would otherwise stay in memory for as long as the records do (a training
        worker's whole run). `annotation_file`, `categories` and `has_annotations` are
        the same either way."""
        data_dir = Path(data_dir)
        index_path = data_dir / INDEX_FILE
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{index_path}: not found: the data stage output is missing ({_FIX})") from None
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{index_path}: unreadable ({err}); {_FIX}") from None
        entry = index.get("splits", {}).get(split)
        if entry is None:
            raise UserError(f"{index_path}: no split {split!r}; it has {sorted(index.get('splits', {}))}")
        annotation_file = data_dir / entry["annotations"]
        image_dir = data_dir / entry["image_dir"]  # an absolute image_dir stays as it is
        # What is not wanted is let go while the json is parsed (a json object_hook sees each
        # annotation as soon as it is complete), so it is never held for the whole file at once.
        hook = _drop_annotation if not with_annotations else None if with_masks else _drop_segmentation
        coco = json.loads(annotation_file.read_text(encoding="utf-8"), object_hook=hook)
        if with_annotations:
            by_image: dict[int, list[dict]] = {img["id"]: [] for img in coco["images"]}
            for ann in coco.get("annotations", []):
                by_image[ann["image_id"]].append(ann)
            images = [_record(img, by_image[img["id"]], image_dir, with_masks=with_masks) for img in coco["images"]]
        else:
            images = [ImageRecord(image_id=int(img["id"]), path=image_dir / img["file_name"],
                                  width=int(img["width"]), height=int(img["height"]), boxes=None,
                                  category_ids=None, iscrowd=None, segmentations=None)
                      for img in coco["images"]]
        return cls(name=split, images=images, categories=CategoryMap.from_coco(coco["categories"]),
                   annotation_file=annotation_file, image_dir=image_dir,
                   has_annotations=bool(entry["has_annotations"]),
                   context_category_ids=tuple(int(c) for c in coco.get(CONTEXT_IDS_KEY, [])),
                   source=str(index.get("source", "")))


def _is_annotation(obj: dict) -> bool:
    return "bbox" in obj and "image_id" in obj


def _drop_annotation(obj: dict) -> dict | None:
    return None if _is_annotation(obj) else obj


def _drop_segmentation(obj: dict) -> dict:
    if _is_annotation(obj):
        obj.pop("segmentation", None)
    return obj


def _record(img: dict, annotations: list[dict], image_dir: Path, *, with_masks: bool) -> ImageRecord:
    boxes_xywh = np.array([ann["bbox"] for ann in annotations], dtype=np.float32).reshape(-1, 4)  # (G, 4)
    return ImageRecord(
        image_id=int(img["id"]), path=image_dir / img["file_name"], width=int(img["width"]),
        height=int(img["height"]), boxes=box_xywh_to_xyxy(torch.from_numpy(boxes_xywh)).numpy(),
        category_ids=np.array([ann["category_id"] for ann in annotations], dtype=np.int64),
        iscrowd=np.array([bool(ann.get("iscrowd", 0)) for ann in annotations], dtype=bool),
        segmentations=[ann["segmentation"] for ann in annotations] if with_masks else None)


def instance_masks(record: ImageRecord) -> np.ndarray:
    """The record's segmentations rasterized: bool (G, H, W), one mask per box (polygons or RLE)."""
    if record.segmentations is None:
        raise ValueError(f"image {record.image_id}: its split was loaded without masks (with_masks=False)")
    masks = np.zeros((len(record.segmentations), record.height, record.width), dtype=bool)  # (G, H, W)
    for g, seg in enumerate(record.segmentations):
        rle = segmentation_to_rle(seg, height=record.height, width=record.width)
        masks[g] = mask_utils.decode(rle).astype(bool)
    return masks
