"""DetectionSplit.load with and without the per-image ground truth."""
from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from ion.data.split import INDEX_FILE, DetectionSplit, instance_masks


def _data_dir(tmp_path):
    coco = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 40, "height": 30},
                   {"id": 3, "file_name": "b.jpg", "width": 20, "height": 50}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 2, "bbox": [1, 2, 10, 5], "iscrowd": 0,
                         "area": 50, "segmentation": [[1, 2, 11, 2, 11, 7]]}],
        "categories": [{"id": 2, "name": "cat"}, {"id": 5, "name": "dog"}],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "minival.json").write_text(json.dumps(coco))
    (tmp_path / INDEX_FILE).write_text(json.dumps({"source": "coco", "splits": {"minival": {
        "annotations": "annotations/minival.json", "image_dir": "images", "has_annotations": True}}}))
    return tmp_path


def test_light_load_has_the_images_and_no_ground_truth(tmp_path):
    data = _data_dir(tmp_path)
    full = DetectionSplit.load(data, "minival")
    light = DetectionSplit.load(data, "minival", with_annotations=False)
    for split in (full, light):
        assert [(r.image_id, r.path, r.width, r.height) for r in split.images] == [
            (7, data / "images" / "a.jpg", 40, 30), (3, data / "images" / "b.jpg", 20, 50)]
        assert split.annotation_file == data / "annotations" / "minival.json" and split.has_annotations
        assert list(split.categories.ids) == [2, 5] and split.source == "coco"
    np.testing.assert_array_equal(full.images[0].boxes, [[1, 2, 11, 7]])
    assert len(full.images[1].boxes) == 0
    assert all(r.boxes is None and r.category_ids is None and r.iscrowd is None and r.segmentations is None
               for r in light.images)


def _peak_bytes(load) -> tuple[DetectionSplit, int]:
    tracemalloc.start()
    try:
        split = load()
        return split, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_without_masks_the_segmentations_are_dropped_while_parsing(tmp_path):
    """Training without a segmentation loss loads boxes only: the same ground truth, no polygons, and the
    polygons are let go as the json is parsed (never all held at once: the peak is far below a full load)."""
    data = _data_dir(tmp_path)
    polygon = [0.5, 1.5, 2.5] * 1500  # a long COCO polygon: most of the file's bytes (4 per float, 32 parsed)
    coco = json.loads((data / "annotations" / "minival.json").read_text())
    coco["images"] = [{"id": i, "file_name": f"{i}.jpg", "width": 40, "height": 30} for i in range(1, 61)]
    coco["annotations"] = [{"id": i, "image_id": i, "category_id": 2 + 3 * (i % 2), "bbox": [1, 2, i % 9 + 1, 5],
                            "iscrowd": int(i % 10 == 0), "area": 50,
                            "segmentation": {"size": [30, 40], "counts": [5, 1195]} if i % 10 == 0 else [polygon]}
                           for i in range(1, 61)]
    (data / "annotations" / "minival.json").write_text(json.dumps(coco, separators=(",", ":")))
    full, full_peak = _peak_bytes(lambda: DetectionSplit.load(data, "minival"))
    boxes, boxes_peak = _peak_bytes(lambda: DetectionSplit.load(data, "minival", with_masks=False))
    for a, b in zip(full.images, boxes.images, strict=True):
        assert (a.image_id, a.path, a.width, a.height) == (b.image_id, b.path, b.width, b.height)
        for field in ("boxes", "category_ids", "iscrowd"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
            assert getattr(a, field).dtype == getattr(b, field).dtype
        assert len(a.segmentations) == 1 and b.segmentations is None
    assert instance_masks(full.images[9]).shape == (1, 30, 40)
    with pytest.raises(ValueError, match="image 10: its split was loaded without masks"):
        instance_masks(boxes.images[9])
    assert boxes_peak < full_peak / 2
