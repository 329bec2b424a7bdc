"""write_compact_json_atomic: json.dumps's compact text, byte for byte, written a piece at a time."""
from __future__ import annotations

import json

import pytest

import ion.atomic as atomic


def test_the_pieces_make_json_dumps_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "JSON_LIST_BATCH", 3)  # lists of 0, 1, 3, 7 elements: empty, one, whole, 3+3+1
    coco = {"info": {"description": "caf\u00e9 \u2603", "version": "1"}, "licenses": [],
            "images": [{"id": i, "file_name": f"{i:07d}.jpg", "width": 40 + i, "height": 30} for i in range(7)],
            "annotations": [{"id": 1, "bbox": [0.1, 2.5e-7, 1e20, 3.0], "segmentation": [[1.5, 2, 3.25]]}],
            "categories": [{"id": c, "name": n} for c, n in ((1, "a"), (2, "b\"q\\"), (3, "\u00e9"))],
            "context_category_ids": [1, 2, 3], "count": 7, "none": None}
    path = atomic.write_compact_json_atomic(tmp_path / "a.json", coco)
    assert path.read_bytes() == json.dumps(coco, separators=(",", ":")).encode("utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left
    assert atomic.write_compact_json_atomic(tmp_path / "b.json", {}).read_bytes() == b"{}"


def test_a_key_that_is_not_a_string_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(TypeError, match="key 3 is not a string"):
        atomic.write_compact_json_atomic(tmp_path / "a.json", {"a": [1], 3: "x"})
    assert list(tmp_path.iterdir()) == []
