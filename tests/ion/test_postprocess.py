"""postprocess (score threshold, per-class NMS, weighted voting, top-k) against
a plain per-box Python loop, and its edge cases."""
import numpy as np
import pytest
import torch
import torchvision

from ion.inference.postprocess import Detections, nms_per_class, postprocess


def _iou(a, b) -> float:
    """IoU of two xyxy boxes in Python floats, torchvision.ops.box_iou's formula."""
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = w * h
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter)


def reference_postprocess(boxes, scores, labels, *, nms_iou, vote_iou, score_thresh, max_dets):
    """One box at a time: threshold, greedy per-class NMS (ties: lower index
    first), top max_dets, MR-CNN weighted voting over all same-class candidates."""
    boxes = [[float(v) for v in b] for b in boxes]
    scores = [float(s) for s in scores]
    labels = [int(label) for label in labels]
    passed = [i for i in range(len(scores)) if scores[i] >= score_thresh]
    kept = []
    for i in sorted(passed, key=lambda i: (-scores[i], i)):
        if all(labels[j] != labels[i] or _iou(boxes[j], boxes[i]) <= nms_iou for j in kept):
            kept.append(i)
    kept = kept[:max_dets]
    out = []
    for k in kept:
        if vote_iou is None:
            out.append(boxes[k])
            continue
        total, weight = [0.0] * 4, 0.0
        for m in passed:
            if labels[m] == labels[k] and (m == k or _iou(boxes[k], boxes[m]) >= vote_iou):
                weight += scores[m]
                total = [t + scores[m] * v for t, v in zip(total, boxes[m])]
        out.append([t / weight for t in total])
    return (np.array(out, dtype=np.float64).reshape(-1, 4), np.array([scores[k] for k in kept]),
            np.array([labels[k] for k in kept]))


def random_candidates(seed: int, *, objects: int = 12, per_object: int = 25, background: int = 60,
                      classes: int = 3):
    """Clusters of jittered boxes around random objects plus scattered boxes,
    a few classes, float32 scores in [0.01, 1)."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(50, 450, (objects, 2))
    size = rng.uniform(20, 150, (objects, 2))
    obj = np.repeat(np.arange(objects), per_object)
    c = centre[obj] + rng.normal(0, 0.15, (len(obj), 2)) * size[obj]
    s = size[obj] * np.exp(rng.normal(0, 0.15, (len(obj), 2)))
    bg_c = rng.uniform(0, 500, (background, 2))
    bg_s = rng.uniform(10, 200, (background, 2))
    c, s = np.concatenate([c, bg_c]), np.concatenate([s, bg_s])
    boxes = np.concatenate([c - s / 2, c + s / 2], axis=1).astype(np.float32)
    labels = np.concatenate([rng.integers(1, classes + 1, objects)[obj],
                             rng.integers(1, classes + 1, background)]).astype(np.int64)
    scores = rng.uniform(0.01, 1.0, len(labels)).astype(np.float32)
    return boxes, scores, labels


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("nms_iou, vote_iou, score_thresh, max_dets", [
    (0.3, None, 0.05, 100),
    (0.443, 0.854, 0.05, 100),
    (0.5, 0.5, 0.2, 100),
    (0.7, 0.6, 0.05, 15),
    (0.6, 0.9, 0.4, 5),
])
def test_matches_reference_loop(seed, nms_iou, vote_iou, score_thresh, max_dets):
    boxes, scores, labels = random_candidates(seed)
    dets = postprocess(boxes, scores, labels, nms_iou=nms_iou, vote_iou=vote_iou, score_thresh=score_thresh,
                       max_dets=max_dets)
    ref_boxes, ref_scores, ref_labels = reference_postprocess(
        boxes, scores, labels, nms_iou=nms_iou, vote_iou=vote_iou, score_thresh=score_thresh, max_dets=max_dets)
    assert len(ref_scores) > 1
    np.testing.assert_array_equal(dets.labels, ref_labels)
    np.testing.assert_array_equal(dets.scores, ref_scores.astype(np.float32))
    np.testing.assert_allclose(dets.boxes, ref_boxes, rtol=0, atol=1e-4)
    assert dets.boxes.dtype == np.float32 and dets.scores.dtype == np.float32 and dets.labels.dtype == np.int64


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("matrix_pairs", [0, 10_000, 10**12])
def test_matrix_and_pair_voting_match_the_reference_loop(seed, matrix_pairs, monkeypatch):
    # Classes above MATRIX_VOTE_PAIRS vote through an IoU matrix, the others through
    # the pair list: all (0), some (10000: the dominant class of this set) or none (10**12).
    import ion.inference.postprocess as postprocess_module
    monkeypatch.setattr(postprocess_module, "MATRIX_VOTE_PAIRS", matrix_pairs)
    boxes, scores, labels = random_candidates(seed, objects=20, per_object=40, background=100, classes=3)
    labels[: len(labels) // 2] = 1  # one class dominates, as with a weak detector
    params = dict(nms_iou=0.5, vote_iou=0.6, score_thresh=0.05, max_dets=100)
    dets = postprocess(boxes, scores, labels, **params)
    ref_boxes, ref_scores, ref_labels = reference_postprocess(boxes, scores, labels, **params)
    np.testing.assert_array_equal(dets.labels, ref_labels)
    np.testing.assert_array_equal(dets.scores, ref_scores.astype(np.float32))
    np.testing.assert_allclose(dets.boxes, ref_boxes, rtol=0, atol=1e-4)
    assert np.abs(postprocess(boxes, scores, labels, **{**params, "vote_iou": None}).boxes - dets.boxes).max() > 1


def test_voting_moves_boxes_in_the_reference_cases():
    """The reference comparison above is not vacuous: voting changes boxes."""
    boxes, scores, labels = random_candidates(0)
    plain = postprocess(boxes, scores, labels, nms_iou=0.5, vote_iou=None)
    voted = postprocess(boxes, scores, labels, nms_iou=0.5, vote_iou=0.5)
    assert np.abs(plain.boxes - voted.boxes).max() > 1.0


@pytest.mark.parametrize("seed", range(3))
def test_plain_nms_equals_torchvision_batched_nms(seed):
    boxes, scores, labels = random_candidates(seed, classes=5)
    dets = postprocess(boxes, scores, labels, nms_iou=0.45, vote_iou=None, score_thresh=0.0, max_dets=10_000)
    keep = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                       torch.from_numpy(labels), 0.45).numpy()
    np.testing.assert_array_equal(dets.boxes, boxes[keep])
    np.testing.assert_array_equal(dets.scores, scores[keep])
    np.testing.assert_array_equal(dets.labels, labels[keep])


def test_voting_leaves_scores_and_labels_unchanged():
    boxes, scores, labels = random_candidates(5)
    plain = postprocess(boxes, scores, labels, nms_iou=0.4, vote_iou=None)
    for vote_iou in (0.3, 0.7, 0.95):
        voted = postprocess(boxes, scores, labels, nms_iou=0.4, vote_iou=vote_iou)
        np.testing.assert_array_equal(voted.scores, plain.scores)
        np.testing.assert_array_equal(voted.labels, plain.labels)


def test_voting_known_values():
    """Kept box [0,0,10,10] (score 0.6) takes the vote of the same-class box it
    suppressed (IoU 0.9, score 0.3); the other-class box and the same-class
    box of IoU 0.4 do not vote."""
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 10], [0, 0, 4, 10]], dtype=np.float32)
    scores = np.array([0.6, 0.3, 0.9, 0.5], dtype=np.float32)
    labels = np.array([1, 1, 2, 1])
    dets = postprocess(boxes, scores, labels, nms_iou=0.8, vote_iou=0.5)
    np.testing.assert_array_equal(dets.labels, [2, 1, 1])
    np.testing.assert_allclose(dets.boxes[1], [0, 0, 10, (0.6 * 10 + 0.3 * 9) / 0.9], rtol=1e-6)
    np.testing.assert_array_equal(dets.boxes[0], [0, 0, 10, 10])
    np.testing.assert_allclose(dets.boxes[2], [0, 0, 4, 10])  # [0,0,10,10] overlaps it by 0.4 < 0.5


def test_vote_iou_one_changes_nothing_but_exact_duplicates():
    boxes, scores, labels = random_candidates(7)
    plain = postprocess(boxes, scores, labels, nms_iou=0.5, vote_iou=None)
    voted = postprocess(boxes, scores, labels, nms_iou=0.5, vote_iou=1.0)
    np.testing.assert_allclose(voted.boxes, plain.boxes, rtol=1e-6)


def test_max_dets_keeps_the_highest_scoring_prefix():
    """Also checks the NMS prefix growth: 40 near-identical top boxes leave one
    survivor in the first prefix, so it has to look further."""
    boxes, scores, labels = random_candidates(1, objects=30, per_object=20)
    dup = np.tile(np.array([[100, 100, 200, 200]], dtype=np.float32), (40, 1))
    boxes = np.concatenate([dup, boxes])
    scores = np.concatenate([np.linspace(1.5, 1.1, 40, dtype=np.float32), scores])
    labels = np.concatenate([np.ones(40, dtype=np.int64), labels])
    full = postprocess(boxes, scores, labels, nms_iou=0.5, vote_iou=0.7, max_dets=10_000)
    assert len(full.scores) > 30
    for max_dets in (1, 5, 10, 30):
        top = postprocess(boxes, scores, labels, nms_iou=0.5, vote_iou=0.7, max_dets=max_dets)
        assert len(top.scores) == max_dets
        for got, want in zip(top, full):
            np.testing.assert_array_equal(got, want[:max_dets])
    assert np.all(np.diff(full.scores) <= 0)


def test_nms_prefix_equals_full_scan():
    boxes, scores, labels = random_candidates(3, objects=40, per_object=30, background=300, classes=4)
    full = nms_per_class(boxes, scores, labels, iou_threshold=0.5)
    for max_kept in (1, 7, 50, 100, 10_000):
        np.testing.assert_array_equal(
            nms_per_class(boxes, scores, labels, iou_threshold=0.5, max_kept=max_kept), full[:max_kept])


def test_score_threshold_drops_candidates_from_detections_and_votes():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 12], [50, 50, 60, 60]], dtype=np.float32)
    scores = np.array([0.9, 0.04, 0.3], dtype=np.float32)
    labels = np.array([1, 1, 1])
    dets = postprocess(boxes, scores, labels, nms_iou=0.5, vote_iou=0.5, score_thresh=0.05)
    np.testing.assert_array_equal(dets.boxes, boxes[[0, 2]])  # the 0.04 box would have voted for box 0
    dets = postprocess(boxes, scores, labels, nms_iou=0.5, vote_iou=0.5, score_thresh=0.5)
    np.testing.assert_array_equal(dets.scores, scores[[0]])
    boxes, scores, labels = random_candidates(2)
    dets = postprocess(boxes, scores, labels, nms_iou=0.5, vote_iou=0.8, score_thresh=0.6)
    passed = scores >= 0.6
    same = postprocess(boxes[passed], scores[passed], labels[passed], nms_iou=0.5, vote_iou=0.8, score_thresh=0.6)
    assert dets.scores.min() >= 0.6
    for got, want in zip(dets, same):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("vote_iou", [None, 0.8])
def test_empty_input_and_nothing_above_threshold(vote_iou):
    empty = postprocess(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                        nms_iou=0.5, vote_iou=vote_iou)
    low = postprocess(np.array([[0, 0, 5, 5]], np.float32), np.array([0.01], np.float32), np.array([1]),
                      nms_iou=0.5, vote_iou=vote_iou)
    for dets in (empty, low):
        assert dets.boxes.shape == (0, 4) and dets.scores.shape == (0,) and dets.labels.shape == (0,)
        assert dets.boxes.dtype == np.float32 and dets.labels.dtype == np.int64


def test_zero_area_box_votes_only_for_itself():
    boxes = np.array([[5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 10, 10]], dtype=np.float32)
    scores = np.array([0.9, 0.5, 0.8], dtype=np.float32)
    dets = postprocess(boxes, scores, np.array([1, 1, 1]), nms_iou=0.5, vote_iou=0.5)
    assert np.isfinite(dets.boxes).all()
    np.testing.assert_array_equal(dets.boxes[0], [5, 5, 5, 5])


def test_torch_input_gives_the_same_tensors():
    boxes, scores, labels = random_candidates(4)
    expected = postprocess(boxes, scores, labels, nms_iou=0.5, vote_iou=0.7)
    got = postprocess(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels),
                      nms_iou=0.5, vote_iou=0.7)
    assert isinstance(got, Detections) and all(isinstance(t, torch.Tensor) for t in got)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g.numpy(), e)
