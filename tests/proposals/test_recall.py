"""Proposal recall against hand-computed values."""
import json

import matplotlib.image
import numpy as np
import pytest

from proposals.recall import (
    GroundTruth,
    best_overlaps,
    box_iou_numpy,
    curve_counts,
    evaluate_recall,
    load_ground_truth,
    plot_recall,
    store_recall,
)
from proposals.store import ProposalStore, write_store


def gt(boxes, areas, crowd=None):
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    crowd = np.zeros(len(boxes), bool) if crowd is None else np.array(crowd, bool)
    return GroundTruth(boxes=boxes, areas=np.array(areas, np.float64), iscrowd=crowd)


# Image 1: A small (area 100), B medium (1600), a crowd box. Image 2: D large.
GROUND_TRUTH = {
    1: gt([[0, 0, 10, 10], [0, 0, 40, 40], [50, 50, 60, 60]], [100, 1600, 100], [0, 0, 1]),
    2: gt([[0, 0, 100, 100]], [10000]),
    3: gt([[0, 0, 5, 5]], [25], [1]),  # only crowd: contributes nothing
}
PROPOSALS = {
    # IoU with A / B: p0 0.5 / 0.03125, p1 0.0625 / 1, p2 0.8 / 0.05, p3 only on the crowd box.
    1: np.array([[0, 0, 10, 5], [0, 0, 40, 40], [0, 0, 10, 8], [50, 50, 60, 60]], np.float32),
    # IoU with D: 0.7, 0.9.
    2: np.array([[0, 0, 100, 70], [0, 0, 100, 90]], np.float32),
    3: np.zeros((0, 4), np.float32),
}


def test_box_iou_known_values():
    iou = box_iou_numpy(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 5], [5, 5, 15, 15], [20, 20, 30, 30],
                                                        [3, 3, 3, 3]]))
    np.testing.assert_allclose(iou, [[0.5, 25 / 175, 0.0, 0.0]])
    assert box_iou_numpy(np.zeros((0, 4)), np.zeros((2, 4))).shape == (0, 2)


def test_best_overlaps_among_first_n():
    best = best_overlaps(GROUND_TRUTH[1].boxes[:2], PROPOSALS[1], counts=(1, 2, 3, 100))
    np.testing.assert_allclose(best, [[0.5, 0.03125], [0.5, 1.0], [0.8, 1.0], [0.8, 1.0]])
    assert best_overlaps(GROUND_TRUTH[1].boxes, np.zeros((0, 4)), (1, 5)).tolist() == [[0, 0, 0]] * 2


def test_recall_hand_computed():
    result = evaluate_recall(GROUND_TRUTH, PROPOSALS.__getitem__, [1, 2, 3], counts=(1, 2, 3))
    assert result.num_gt == {"all": 3, "small": 1, "medium": 1, "large": 1}
    # N = 1: best IoU A 0.5, B 0.03, D 0.7. t = 0.5: A, D; t = 0.55..0.7 (4): D; t >= 0.75: none.
    assert result.average_recall(1) == pytest.approx((2 / 3 + 4 * 1 / 3) / 10)
    assert result.recall_at(0.5, 1) == pytest.approx(2 / 3)
    assert result.recall_at(0.7, 1) == pytest.approx(1 / 3)  # IoU exactly 0.7 counts
    # N = 2: A 0.5, B 1.0, D 0.9. t = 0.5: all; 0.55..0.9 (8): B, D; 0.95: B.
    assert result.average_recall(2) == pytest.approx((1 + 8 * 2 / 3 + 1 / 3) / 10)
    # N = 3: A 0.8, B 1.0, D 0.9. t <= 0.8 (7): all; 0.85, 0.9: B, D; 0.95: B.
    assert result.average_recall(3) == pytest.approx((7 + 2 * 2 / 3 + 1 / 3) / 10)
    assert result.average_recall(1, "small") == pytest.approx(0.1)
    assert result.average_recall(1, "medium") == 0.0
    assert result.average_recall(2, "medium") == 1.0
    assert result.average_recall(1, "large") == pytest.approx(0.5)
    np.testing.assert_allclose(result.ar_curve(), [0.2, 2 / 3, 26 / 30])

    metrics = result.metrics(counts=(1, 3))
    assert metrics["AR@1"] == pytest.approx(0.2) and metrics["R50@3"] == 1.0
    assert metrics["AR_large@3"] == pytest.approx(0.9) and metrics["R70@1"] == pytest.approx(1 / 3)
    assert set(metrics) == {f"{m}@{n}" for n in (1, 3)
                            for m in ("AR", "AR_small", "AR_medium", "AR_large", "R50", "R70")}
    report = json.loads(json.dumps(result.to_json()))
    assert report["average_recall"]["all"] == pytest.approx([0.2, 2 / 3, 26 / 30])
    assert report["recall_50"]["all"] == pytest.approx([2 / 3, 1.0, 1.0])


def test_no_one_to_one_matching():
    # Two identical objects and one proposal on them: both are recalled (Hosang et al.);
    # COCO's greedy one-to-one matching would recall one.
    ground_truth = {1: gt([[0, 0, 10, 10], [0, 0, 10, 10]], [100, 100])}
    result = evaluate_recall(ground_truth, lambda _: np.array([[0, 0, 10, 10]], np.float32), [1], counts=(1,))
    assert result.average_recall(1) == 1.0


def test_size_ranges_are_half_open_on_the_annotation_area():
    # Box areas are all 100 px; the annotation areas decide: exactly 32^2 is medium, 96^2 large.
    ground_truth = {1: gt([[0, 0, 10, 10]] * 3, [1023.0, 1024.0, 9216.0])}
    result = evaluate_recall(ground_truth, lambda _: np.array([[0, 0, 10, 10]], np.float32), [1], counts=(1,))
    assert result.num_gt == {"all": 3, "small": 1, "medium": 1, "large": 1}


def test_load_ground_truth_and_store_recall(tmp_path):
    annotations = {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [0, 0, 10, 10], "area": 80.0, "iscrowd": 0, "category_id": 1},
            {"id": 2, "image_id": 1, "bbox": [0, 0, 40, 40], "area": 1500.0, "iscrowd": 0, "category_id": 1},
            {"id": 3, "image_id": 1, "bbox": [50, 50, 10, 10], "area": 100.0, "iscrowd": 1, "category_id": 1},
            {"id": 4, "image_id": 2, "bbox": [0, 0, 100, 100], "area": 9900.0, "iscrowd": 0, "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(annotations))
    ground_truth = load_ground_truth(path)
    np.testing.assert_array_equal(ground_truth[1].boxes, GROUND_TRUTH[1].boxes)
    assert ground_truth[1].iscrowd.tolist() == [False, False, True]
    assert ground_truth[2].areas.tolist() == [9900.0]

    items = [(i, PROPOSALS[i], np.linspace(1, 0, len(PROPOSALS[i])).astype(np.float32)) for i in (1, 2)]
    with ProposalStore(write_store(tmp_path / "p.h5", items, {"source": "x"})) as store:
        result = store_recall(store, ground_truth, counts=(1, 2, 3))
        np.testing.assert_allclose(result.ar_curve(), [0.2, 2 / 3, 26 / 30])
    with ProposalStore(write_store(tmp_path / "q.h5", items[:1], {"source": "x"})) as store:
        with pytest.raises(ValueError, match="no proposals for 1 annotated images"):
            store_recall(store, ground_truth, counts=(1,))


def test_curve_counts_include_the_reported_counts():
    counts = curve_counts((100, 300, 1000, 2000))
    assert counts[0] == 1 and counts[-1] == 2000
    assert {100, 300, 1000, 2000} <= set(counts) and list(counts) == sorted(set(counts))


def test_plot_recall_writes_a_png(tmp_path):
    path = plot_recall({"rpn1": ((1, 10, 100), (0.1, 0.3, 0.5)), "mcg": ((1, 10, 100), (0.05, 0.4, 0.6))},
                       tmp_path / "plots" / "recall.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).shape[:2] == (450, 600)
