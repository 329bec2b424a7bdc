"""Test-time post-processing of one image's raw candidates: score threshold,
per-class NMS, weighted voting (Sec. 4.2, Appendix item 5), top detections.

The input is what `ion.inference.predict.predict_raw` returns for one image: flat
candidates pooled from both bounding-box regression rounds, every one with a
class score >= 0.05. The tune stage calls `postprocess` on every minival
image in every trial, on the same cached candidates, so the cost per call is
what matters: numpy on the CPU (a numpy op costs a few microseconds, a torch op
several times that), torchvision's C++ kernel for the greedy NMS scan, no
Python loop over boxes, and a loop over classes only for the few that hold
enough (kept, candidate) pairs to vote as a matrix (weighted_vote). Torch
tensors are accepted too (moved to the CPU and back), so the detector's own
code can call it.
"""
from __future__ import annotations

from typing import NamedTuple, Union

import numpy as np
import torch
from torch import Tensor

ArrayLike = Union[np.ndarray, Tensor]


class Detections(NamedTuple):
    """One image's detections (or raw candidates), sorted by decreasing score
    when they come out of `postprocess`.

    boxes: float32 (N, 4) `[x1, y1, x2, y2]` in original-image pixels;
    scores: float32 (N,); labels: int64 (N,), contiguous classes 1..K.
    All numpy arrays, or all torch tensors.
    """

    boxes: ArrayLike
    scores: ArrayLike
    labels: ArrayLike


def postprocess(boxes: ArrayLike, scores: ArrayLike, labels: ArrayLike, *, nms_iou: float,
                vote_iou: float | None, score_thresh: float = 0.05, max_dets: int = 100) -> Detections:
    """Detections of one image from its raw candidates.

    1. keep candidates with score >= `score_thresh`;
    2. per-class greedy NMS at `nms_iou`: a box is suppressed by a kept
       higher-scoring box of its class with IoU > nms_iou (torchvision's rule;
       equal scores: the earlier candidate first);
    3. the `max_dets` highest-scoring survivors (Sec. 4.1: at most 100);
    4. weighted voting when `vote_iou` is not None (MR-CNN, Appendix item 5):
       each kept box becomes the score-weighted mean of all same-class
       candidates that passed step 1, suppressed ones included, whose IoU with
       it is >= vote_iou; its score stays. `vote_iou=None`: plain NMS.

    boxes: (M, 4) float `[x1, y1, x2, y2]`; scores: (M,); labels: (M,) int.
    Returns `Detections` sorted by decreasing score, at most `max_dets` long:
    numpy arrays for numpy input, tensors on the input's device for tensors.
    """
    device = boxes.device if isinstance(boxes, Tensor) else None
    boxes_np = _to_numpy(boxes, np.float32).reshape(-1, 4)
    scores_np = _to_numpy(scores, np.float32)
    labels_np = _to_numpy(labels, np.int64)

    passed = scores_np >= score_thresh
    if not passed.all():
        boxes_np = np.compress(passed, boxes_np, axis=0)
        scores_np, labels_np = scores_np[passed], labels_np[passed]
    keep = nms_per_class(boxes_np, scores_np, labels_np, iou_threshold=nms_iou, max_kept=max_dets)
    if vote_iou is not None and len(keep) > 0:
        kept_boxes = weighted_vote(keep=keep, boxes=boxes_np, scores=scores_np, labels=labels_np,
                                   vote_iou=vote_iou)
    else:
        kept_boxes = np.take(boxes_np, keep, axis=0)
    dets = Detections(kept_boxes, np.take(scores_np, keep), np.take(labels_np, keep))
    if device is None:
        return dets
    return Detections(*(torch.from_numpy(x).to(device) for x in dets))


def nms_per_class(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, *, iou_threshold: float,
                  max_kept: int | None = None) -> np.ndarray:
    """Greedy per-class NMS; the indices of the first `max_kept` kept boxes,
    by decreasing score (equal scores: lower index first).

    One `torchvision.ops.nms` call for all classes: each class is shifted by
    its own offset so that boxes of different classes never overlap
    (torchvision's coordinate trick), in float64, because in float32 an offset
    of ~1e5 px rounds coordinates by ~0.01 px, enough to change which boxes
    survive. Greedy NMS decides a box from the higher-scoring ones alone, so
    when only `max_kept` boxes are wanted it runs on a prefix of the
    score-sorted boxes first (the scan costs kept x boxes) and on a longer one
    only if the prefix keeps fewer than `max_kept`.

    boxes: (M, 4) xyxy, scores: (M,), labels: (M,) int -> (N,) int64 indices.
    """
    n = len(scores)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")  # (M,)
    boxes64 = np.take(boxes, order, axis=0).astype(np.float64)  # np.take: fancy row indexing is far slower
    span = boxes64.max() - boxes64.min() + 1.0
    shifted = torch.from_numpy(boxes64 + (np.take(labels, order) * span)[:, None])  # (M, 4)
    # The kernel sorts by its scores again: give it the rank, so its order is ours.
    rank_scores = torch.from_numpy(np.arange(n, 0, -1, dtype=np.float64))
    prefix = n if max_kept is None else min(n, 3 * max_kept)
    while True:
        # torchvision.ops.nms minus its per-call usage logging, a third of the cost of a small call
        keep = torch.ops.torchvision.nms(shifted[:prefix], rank_scores[:prefix], iou_threshold).numpy()
        if prefix == n or len(keep) >= max_kept:
            break
        # Grow the prefix to where, at the rate seen so far, max_kept boxes survive.
        prefix = min(n, max(2 * prefix, int(1.25 * prefix * max_kept / max(len(keep), 1))))
    return order[keep[:max_kept]]


# A class whose kept boxes x candidates exceed this many pairs is voted as one
# (kept, candidates) IoU matrix and a matrix product: a detector's candidates are
# often mostly one class (100 kept x thousands of candidates), where gathering
# each pair's coordinates costs 3-4x more; below it, one vectorised pass over
# the pairs of all small classes beats a Python loop over them.
MATRIX_VOTE_PAIRS = 20_000


def weighted_vote(*, keep: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                  vote_iou: float) -> np.ndarray:
    """Weighted voting (MR-CNN, as used in Sec. 4.2 and Appendix item 5).

    keep: (N,) indices of the kept boxes into the candidates; boxes (M, 4),
    scores (M,), labels (M,): all candidates, suppressed ones included.
    Returns the voted boxes float32 (N, 4): kept box n becomes
    sum_m w_nm * box_m / sum_m w_nm, w_nm = score_m where label_m == label_n
    and IoU(n, m) >= vote_iou, else 0; a kept box always votes for itself.
    Only same-class (kept, candidate) pairs are formed, not the N x M matrix;
    IoU in float64 (torchvision's formula), so rounding does not decide who votes.
    """
    by_label = np.argsort(labels, kind="stable")  # (M,)
    sorted_labels = np.take(labels, by_label)
    kept_labels = np.take(labels, keep)
    start = np.searchsorted(sorted_labels, kept_labels, side="left")  # (N,)
    count = np.searchsorted(sorted_labels, kept_labels, side="right") - start  # >= 1: itself
    _, inverse, kept_per_class = np.unique(kept_labels, return_inverse=True, return_counts=True)
    matrix = np.take(kept_per_class, inverse) * count >= MATRIX_VOTE_PAIRS  # (N,)
    # Coordinates as rows (4, M): np.take and arithmetic on contiguous rows are
    # several times faster than fancy indexing and strided columns of (M, 4).
    coords = np.ascontiguousarray(boxes.T, dtype=np.float64)  # (4, M)
    voted = np.empty((len(keep), 4), dtype=np.float64)  # (N, 4)
    if not matrix.all():
        pairs = np.flatnonzero(~matrix)
        voted[pairs] = _vote_pairs(np.take(keep, pairs), np.take(start, pairs), np.take(count, pairs),
                                   by_label, coords, scores, vote_iou)
    if matrix.any():
        sorted_coords = np.take(coords, by_label, axis=1)  # (4, M) by class
        sorted_weights = np.take(scores, by_label).astype(np.float64)  # (M,)
        position = np.empty_like(by_label)
        position[by_label] = np.arange(len(by_label))  # candidate -> its column in sorted_coords
        for label in np.unique(kept_labels[matrix]):
            rows = np.flatnonzero(kept_labels == label)  # (n,) the class's kept boxes
            s, e = start[rows[0]], start[rows[0]] + count[rows[0]]
            cand = sorted_coords[:, s:e]  # (4, m)
            kept_coords = np.take(coords, np.take(keep, rows), axis=1)  # (4, n)
            iou = box_iou_pairs(kept_coords[:, :, None], cand[:, None, :])  # (n, m)
            votes = iou >= vote_iou  # NaN IoU of a 0-area box: itself only (below)
            votes[np.arange(len(rows)), np.take(position, np.take(keep, rows)) - s] = True
            weights = np.where(votes, sorted_weights[s:e], 0.0)  # (n, m)
            voted[rows] = (weights @ cand.T) / weights.sum(axis=1, keepdims=True)
    return voted.astype(np.float32)


def _vote_pairs(keep: np.ndarray, start: np.ndarray, count: np.ndarray, by_label: np.ndarray,
                coords: np.ndarray, scores: np.ndarray, vote_iou: float) -> np.ndarray:
    """Voted boxes float64 (N, 4) of kept boxes `keep` (N,) from each (kept,
    same-class candidate) pair: their class's candidates are by_label[start:start + count]."""
    pair_kept = np.repeat(np.arange(len(keep)), count)  # (P,) grouped by kept box
    first_pair = np.cumsum(count) - count  # (N,)
    pair_cand = np.take(by_label, np.repeat(start - first_pair, count) + np.arange(count.sum()))  # (P,)
    cand = np.take(coords, pair_cand, axis=1)  # (4, P)
    iou = box_iou_pairs(np.take(coords, np.take(keep, pair_kept), axis=1), cand)  # (P,)
    votes = (iou >= vote_iou) | (pair_cand == np.take(keep, pair_kept))  # NaN IoU of a 0-area box: itself only
    weights = np.where(votes, np.take(scores, pair_cand).astype(np.float64), 0.0)  # (P,)
    total = np.add.reduceat(cand * weights, first_pair, axis=1)  # (4, N)
    return (total / np.add.reduceat(weights, first_pair)).T  # (N, 4)


def box_iou_pairs(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU of paired boxes given as coordinate rows (4, P) `x1, y1, x2, y2`,
    (4, P) -> (P,) (or rows that broadcast: (4, N, 1) and (4, 1, M) -> (N, M)),
    with torchvision.ops.box_iou's operations in its order; 0/0 (two empty boxes) is NaN."""
    x1, y1, x2, y2 = boxes1
    u1, v1, u2, v2 = boxes2
    w = (np.minimum(x2, u2) - np.maximum(x1, u1)).clip(min=0)
    h = (np.minimum(y2, v2) - np.maximum(y1, v1)).clip(min=0)
    inter = w * h
    area1 = (x2 - x1) * (y2 - y1)
    area2 = (u2 - u1) * (v2 - v1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / (area1 + area2 - inter)


def _to_numpy(x: ArrayLike, dtype: type) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)
