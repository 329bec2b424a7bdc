"""The detect stage's output format: raw per-image candidates before NMS.

Stored in the project's ragged HDF5 store (proposals/store.py), one file per
split and candidate set (`raw_<split>_<set>.h5`, set = plain, round1 or flip;
round1 is the part of plain that round 1 of box regression produced): boxes
float32 (M, 4) xyxy in original-image pixels, scores float32 (M,), and the
contiguous class label of each candidate in the store's per-box int8 tag
column, with `attrs["source_names"][label]` the class name (label 0 =
background, never stored). int8 bounds the classes at 127; COCO has 80.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

from ion.data.categories import CategoryMap
from ion.errors import UserError
from ion.inference.postprocess import Detections
from proposals.store import ProposalStore, write_store

MAX_LABEL = np.iinfo(np.int8).max
ROUND1 = "round1"  # the candidate set of round 1 alone, unflipped
REBUILD = "python -m pipeline run --stages detect --force"


def label_names(categories: CategoryMap) -> list[str]:
    """Names indexed by label: ["__background__", name of label 1, ...]."""
    if categories.num_classes > MAX_LABEL:
        raise ValueError(f"{categories.num_classes} classes: the raw store holds at most {MAX_LABEL}")
    return ["__background__"] + [categories.name(categories.category_id(k))
                                 for k in range(1, categories.num_classes + 1)]


def as_item(image_id: int, raw: dict[str, np.ndarray]) -> tuple:
    """A store item from one image's candidate set (ion.inference.predict.predict_raw)."""
    return int(image_id), raw["boxes"], raw["scores"], raw["labels"].astype(np.int8)


def round_one(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The round-1 candidates of one image's set (ion.inference.predict.predict_raw)."""
    first = raw["round"] == 1
    return {key: value[first] for key, value in raw.items()}


def top_candidates(raw: dict[str, np.ndarray], limit: int | None) -> dict[str, np.ndarray]:
    """At most `limit` candidates of one image's set: the highest scores (ties: the earlier), kept in
    their order. None: all of them."""
    if limit is None or raw["scores"].shape[0] <= limit:
        return raw
    keep = np.sort(np.argsort(-raw["scores"], kind="stable")[:limit])
    return {key: value[keep] for key, value in raw.items()}


def write_raw(path: Path, items: Iterable[tuple], *, categories: CategoryMap, attrs: dict) -> Path:
    """Write `items` (image_id, boxes, scores, labels int8) atomically to `path`."""
    return write_store(path, items, {"source_names": label_names(categories), "content": "raw detections",
                                     **attrs})


def require_raw(path: Path) -> Path:
    """`path`, or a UserError saying how the detect stage makes it."""
    path = Path(path)
    if not path.is_file():  # the store's own message would suggest rebuilding the proposals
        raise UserError(f"{path}: no raw detections: the detect stage writes them for each split in "
                        f"detect.splits (add the split there), or rerun it: {REBUILD}")
    return path


def read_raw(path: Path) -> dict[int, Detections]:
    """Every image's candidates: image id -> Detections(boxes, scores, labels int64), numpy."""
    path = require_raw(path)
    with ProposalStore(path) as store:
        return {image_id: Detections(boxes, scores, labels.astype(np.int64))
                for image_id, boxes, scores, labels in store.iter_items(with_sources=True)}


def iter_raw(paths: Mapping[str, Path]) -> Iterator[tuple[int, dict[str, Detections]]]:
    """(image_id, {name: Detections}) per image, in stored order, reading the
    candidate files `paths` (name -> raw store of one split) side by side a block
    of images at a time, so a split's candidates never sit in memory whole."""
    paths = {name: require_raw(path) for name, path in paths.items()}
    stores = {name: ProposalStore(path) for name, path in paths.items()}
    try:
        orders = {name: store.image_ids.tolist() for name, store in stores.items()}
        first = next(iter(orders.values()), [])
        for name, order in orders.items():
            if order != first:
                raise UserError(f"{paths[name]}: holds other images than {next(iter(paths.values()))}; "
                                f"rebuild the raw detections: {REBUILD}")
        streams = {name: store.iter_items(with_sources=True) for name, store in stores.items()}
        for image_id in first:
            per_set = {}
            for name, stream in streams.items():
                _, boxes, scores, labels = next(stream)
                per_set[name] = Detections(boxes, scores, labels.astype(np.int64))
            yield image_id, per_set
    finally:
        for store in stores.values():
            store.close()
