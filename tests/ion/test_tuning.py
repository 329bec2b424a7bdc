"""The tune objective recovers thresholds that are known by construction:
an NMS interval (Appendix item 5's trade-off between suppressing neighbours
and keeping duplicates) and a voting interval (voting only helps at high IoU
when it averages a symmetric spread of boxes)."""
import numpy as np
import pytest

from ion.evaluation.evaluator import Evaluator
from ion.inference.postprocess import Detections, postprocess
from ion.inference.tuning import Thresholds, apply_thresholds, objective

NEIGHBOUR_IOU = 0.42  # IoU of two adjacent objects of the same class
DUPLICATE_IOU = 0.57  # IoU of a duplicate detection with its object (below the voting interval)
GRID = np.round(np.arange(0.10, 0.91, 0.05), 2)


def _xyxy(x, y, w, h):
    return [x, y, x + w, y + h]


def _dataset(objects_per_image: list[list[list[float]]]) -> dict:
    """COCO ground truth: one category, the given xyxy boxes per image."""
    annotations = []
    for i, boxes in enumerate(objects_per_image):
        for x1, y1, x2, y2 in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 7,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    return {"images": [{"id": i + 1, "width": 640, "height": 480} for i in range(len(objects_per_image))],
            "categories": [{"id": 7, "name": "thing"}], "annotations": annotations}


def _problem(*sets) -> tuple[Evaluator, dict[int, Detections]]:
    """An evaluator and image id -> raw candidates for (gt boxes, raw) sets, images numbered in order."""
    gt_boxes = [boxes for gt, _ in sets for boxes in gt]
    raw = [r for _, raws in sets for r in raws]
    return Evaluator(_dataset(gt_boxes)), {i + 1: r for i, r in enumerate(raw)}


def _raw(boxes, scores) -> Detections:
    return Detections(np.array(boxes, dtype=np.float32), np.array(scores, dtype=np.float32),
                      np.ones(len(scores), dtype=np.int64))


@pytest.fixture(scope="module")
def neighbours():
    """Per image two adjacent objects A, B (IoU 0.42), each detected exactly
    plus one lower-scoring duplicate of IoU 0.57 with it; scores interleave
    across images. NMS below 0.42 loses one object of each pair; at 0.57 and
    above the duplicates survive as false positives ranked above other
    images' objects; in [0.42, 0.57) the detections are perfect."""
    rng = np.random.default_rng(0)
    gt_boxes, raw = [], []
    for i in range(12):
        w, h = rng.uniform(60, 150, 2)
        x, y = rng.uniform(10, 640 - 2.5 * w), rng.uniform(h, 480 - 2 * h)
        shift_x = w * (1 - NEIGHBOUR_IOU) / (1 + NEIGHBOUR_IOU)
        shift_y = h * (1 - DUPLICATE_IOU) / (1 + DUPLICATE_IOU)
        a, b = _xyxy(x, y, w, h), _xyxy(x + shift_x, y, w, h)
        dup_a, dup_b = _xyxy(x, y + shift_y, w, h), _xyxy(x + shift_x, y - shift_y, w, h)
        score_a, score_b = rng.uniform(0.3, 1.0, 2)
        scores = [score_a, score_b, score_a * rng.uniform(0.5, 0.99), score_b * rng.uniform(0.5, 0.99)]
        gt_boxes.append([a, b])
        raw.append(_raw([a, b, dup_a, dup_b], scores))
    return gt_boxes, raw


@pytest.fixture(scope="module")
def symmetric_spread():
    """Per image one object detected only by four equally scored boxes shifted
    by 10% of its size left, right, up and down. NMS 0.5 keeps the first
    (right-shifted, IoU 0.818 with the object). Voting at vote_iou <= 0.667
    averages all four back onto the object; at 0.667 < vote_iou <= 0.681 the
    left box does not vote (IoU 0.935); above, nothing votes."""
    rng = np.random.default_rng(1)
    gt_boxes, raw = [], []
    for i in range(10):
        w, h = rng.uniform(60, 200, 2)
        x, y = rng.uniform(30, 600 - w), rng.uniform(30, 450 - h)
        dx, dy = 0.1 * w, 0.1 * h
        boxes = [_xyxy(x + dx, y, w, h), _xyxy(x - dx, y, w, h), _xyxy(x, y + dy, w, h), _xyxy(x, y - dy, w, h)]
        gt_boxes.append([_xyxy(x, y, w, h)])
        raw.append(_raw(boxes, [rng.uniform(0.2, 1.0)] * 4))
    return gt_boxes, raw


def test_nms_sweep_finds_the_known_interval(neighbours):
    evaluator, raw = _problem(neighbours)
    ap = np.array([objective(evaluator, raw, Thresholds(nms_iou=float(t), vote_iou=None)) for t in GRID])
    best = GRID[ap == ap.max()]
    np.testing.assert_array_equal(best, GRID[(GRID >= NEIGHBOUR_IOU) & (GRID < DUPLICATE_IOU)])
    assert ap.max() == pytest.approx(1.0, abs=1e-12)
    assert ap[GRID < NEIGHBOUR_IOU].max() < 0.8  # half the objects suppressed
    assert ap[GRID >= DUPLICATE_IOU].max() < 0.99  # duplicates ranked above true objects


def test_voting_sweep_finds_the_known_interval(symmetric_spread):
    evaluator, raw = _problem(symmetric_spread)
    votes = [None] + [round(0.5 + 0.05 * k, 2) for k in range(10)]  # 0.5 .. 0.95
    metrics = [evaluator.evaluate(apply_thresholds(raw, nms_iou=0.5, vote_iou=v)) for v in votes]
    ap = np.array([m.stats["AP"] for m in metrics])
    best = [v for v, value in zip(votes, ap) if value == ap.max()]
    assert best == [0.5, 0.55, 0.6, 0.65]
    assert ap.max() == pytest.approx(1.0, abs=1e-12)
    # Unvoted box: IoU 0.818 passes the thresholds 0.5..0.8 only (Sec. 4.4: voting matters at high IoU).
    np.testing.assert_allclose(ap[[votes.index(v) for v in (None, 0.7, 0.8, 0.95)]], 0.7, atol=1e-12)
    assert all(m.stats["AP50"] == pytest.approx(1.0, abs=1e-12) for m in metrics)


def test_joint_sweep_finds_both_intervals(neighbours, symmetric_spread):
    """Both sets together: the best (nms, vote) pairs of a joint grid are the
    product of the two known intervals: nms in [0.42, 0.57), vote in
    (0.57, 0.667] (above the duplicates' IoU, below the spread's)."""
    evaluator, raw = _problem(neighbours, symmetric_spread)
    grid = [(float(n), v) for n in GRID[(GRID >= 0.3) & (GRID <= 0.7)] for v in (None, 0.55, 0.6, 0.65, 0.7, 0.8)]
    ap = np.array([objective(evaluator, raw, {"nms_iou": n, "vote_iou": v}) for n, v in grid])
    best = {grid[i] for i in np.flatnonzero(ap == ap.max())}
    assert best == {(n, v) for n in (0.45, 0.5, 0.55) for v in (0.6, 0.65)}
    assert ap.max() == pytest.approx(1.0, abs=1e-12)
    plain = objective(evaluator, raw, Thresholds(nms_iou=0.3))  # the paper's untuned baseline
    assert ap.max() - plain > 0.1


def test_apply_thresholds_is_postprocess_per_image(symmetric_spread):
    _, raw = _problem(symmetric_spread)
    dets = apply_thresholds(raw, nms_iou=0.4, vote_iou=0.6, score_thresh=0.3, max_dets=2)
    assert list(dets) == list(raw)
    for image_id, r in raw.items():
        want = postprocess(r.boxes, r.scores, r.labels, nms_iou=0.4, vote_iou=0.6, score_thresh=0.3, max_dets=2)
        for got, expected in zip(dets[image_id], want):
            np.testing.assert_array_equal(got, expected)


def test_objective_takes_thresholds_or_their_dict(neighbours):
    evaluator, raw = _problem(neighbours)
    params = Thresholds(nms_iou=0.6, vote_iou=0.8, score_thresh=0.4, max_dets=1)
    want = evaluator.evaluate(apply_thresholds(raw, nms_iou=0.6, vote_iou=0.8, score_thresh=0.4,
                                               max_dets=1)).stats["AP"]
    assert objective(evaluator, raw, params) == want
    assert objective(evaluator, raw, {"nms_iou": 0.6, "vote_iou": 0.8, "score_thresh": 0.4, "max_dets": 1}) == want
    assert 0 < want < 0.6  # one detection per image out of two objects
