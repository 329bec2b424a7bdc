"""DetectionSplit.load with and without the per-image ground truth."""
from __future__ import annotations

import json

import numpy as np

from ion.data.split import INDEX_FILE, DetectionSplit


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
