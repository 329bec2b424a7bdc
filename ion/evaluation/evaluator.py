"""A COCO box evaluator for the tune loop: the same 12 stats as pycocotools
(to the last bit on the checks in tests/ion/test_evaluation.py), tens of times
faster when many detection sets are scored against the same ground truth.

The tune stage scores hundreds of threshold settings on the same minival
images (Appendix item 5), so everything that depends only on the ground truth
is built once in `Evaluator.__init__`: annotations grouped per (image,
category), ignore flags per area range, regular-object counts, and the
recall-threshold crossings. `evaluate` then works on flat arrays:

- one stable sort of the detections per (image, category) by score, the top
  100 kept (pycocotools' maxDets[-1] applies per image *and* category);
- IoU only for detection/ground-truth pairs of the same image and category,
  in float64 with pycocotools' formula (maskApi.c bbIou), keeping the pairs
  with IoU >= 0.5 (no lower threshold can match);
- COCO's greedy matching (COCOeval.evaluateImg), vectorised over all
  (image, category) pairs, the 4 area ranges and the 10 IoU thresholds at
  once, with a loop over the detection rank only: the i-th detection of every
  pair is matched in the same step, as the matching inside one pair is
  sequential while pairs never share a ground-truth box;
- accumulation (COCOeval.accumulate) from the true positives alone: the
  interpolated precision at a recall threshold is the largest precision at or
  after the first true positive that reaches it.

Matching rules kept exactly: a detection takes the available ground truth of
highest IoU (>= the threshold; ties to the later annotation), regular objects
before ignored ones (crowd, or outside the area range); crowd regions can be
matched any number of times, with IoU = intersection / detection area;
unmatched detections outside the area range are ignored; a match to an
annotation with id 0 counts as no match (pycocotools stores the id as the
match flag).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ion.data.categories import CategoryMap
from ion.errors import UserError
from ion.evaluation.ground_truth import GroundTruth, load_coco_dataset
from ion.evaluation.metrics import AREA_RANGES, IOU_THRESHOLDS, MAX_DETS, RECALL_THRESHOLDS, CocoMetrics
from ion.inference.postprocess import Detections
from ion.ops.box_ops import box_xyxy_to_xywh

# pycocotools matches at min(t, 1 - 1e-10) so that IoU 1.0 boxes match at t = 1.
_MATCH_THRESHOLDS = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)  # (T,)
_EPS = np.spacing(1)  # pycocotools' guard in tp / (fp + tp + eps)


class Evaluator:
    """COCO box evaluation against one fixed ground truth.

    `gt`: a COCO json path, its dict or a pycocotools COCO. `categories`: the
    model's label map (labels 1..K -> COCO ids) used by `evaluate`; default:
    the ground truth's categories sorted by id (CategoryMap.from_coco).
    Picklable (numpy arrays only), so trial workers can each hold one.
    """

    def __init__(self, gt: GroundTruth, *, categories: CategoryMap | None = None):
        dataset = load_coco_dataset(gt)
        self.categories = categories or CategoryMap.from_coco(dataset["categories"])
        self.image_ids = np.array(sorted({int(img["id"]) for img in dataset["images"]}), dtype=np.int64)  # (I,)
        self.category_ids = np.array(sorted({int(c["id"]) for c in dataset["categories"]}), dtype=np.int64)  # (K,)
        n_img, n_cat = len(self.image_ids), len(self.category_ids)

        anns = dataset["annotations"]
        img = np.array([a["image_id"] for a in anns], dtype=np.int64)
        cat = np.array([a["category_id"] for a in anns], dtype=np.int64)
        img_idx, img_ok = _lookup(self.image_ids, img)
        cat_idx, cat_ok = _lookup(self.category_ids, cat)
        ok = np.flatnonzero(img_ok & cat_ok)  # pycocotools only sees annotations of known images and categories
        # Stable, so the annotations of one (image, category) stay in file order: COCO breaks IoU ties by it.
        order = ok[np.lexsort((cat_idx[ok], img_idx[ok]))]  # (G,)
        # Coordinates as rows x, y, w, h (4, G): np.take and arithmetic on contiguous
        # rows are several times faster than fancy indexing and strided columns of (G, 4).
        self._gt_box = np.ascontiguousarray(
            np.array([anns[i]["bbox"] for i in order], dtype=np.float64).reshape(-1, 4).T)  # (4, G)
        area = np.array([anns[i]["area"] for i in order], dtype=np.float64)  # (G,)
        self._gt_crowd = np.array([bool(anns[i].get("iscrowd", 0)) for i in order], dtype=bool)  # (G,)
        self._gt_id_nonzero = np.array([anns[i]["id"] != 0 for i in order], dtype=bool)  # (G,)
        gt_cat = cat_idx[order]

        pair = img_idx[order] * n_cat + gt_cat
        counts = np.bincount(pair, minlength=n_img * n_cat)
        self._gt_pair_count = counts  # (I*K,)
        self._gt_pair_start = np.cumsum(counts) - counts  # (I*K,)

        lo = np.array([r[0] for r in AREA_RANGES])
        hi = np.array([r[1] for r in AREA_RANGES])
        # (G, A): crowd boxes and boxes outside the area range are ignored (COCOeval.evaluateImg)
        self._gt_ignored = self._gt_crowd[:, None] | (area[:, None] < lo) | (area[:, None] > hi)
        self._area_lo, self._area_hi = lo, hi
        # (K, A): regular objects per category and area range (pycocotools' npig)
        self._npig = np.stack([np.bincount(gt_cat[~self._gt_ignored[:, a]], minlength=n_cat)
                               for a in range(len(AREA_RANGES))], axis=1)
        self._first_tp_for_recall = _recall_crossings(self._npig)  # (K, A, R)

    def evaluate(self, detections_per_image: Mapping[int, Detections]) -> CocoMetrics:
        """Score per-image detections (labels 1..K, boxes xyxy) keyed by image id."""
        image_ids, boxes_xywh, scores, category_ids = flatten_detections(detections_per_image, self.categories)
        return self.evaluate_arrays(image_ids=image_ids, boxes_xywh=boxes_xywh, scores=scores,
                                    category_ids=category_ids)

    def evaluate_results(self, results: list[dict]) -> CocoMetrics:
        """Score COCO results dicts (as in a results JSON)."""
        return self.evaluate_arrays(
            image_ids=np.array([r["image_id"] for r in results], dtype=np.int64),
            boxes_xywh=np.array([r["bbox"] for r in results], dtype=np.float64).reshape(-1, 4),
            scores=np.array([r["score"] for r in results], dtype=np.float64),
            category_ids=np.array([r["category_id"] for r in results], dtype=np.int64),
        )

    def evaluate_arrays(self, *, image_ids: np.ndarray, boxes_xywh: np.ndarray, scores: np.ndarray,
                        category_ids: np.ndarray) -> CocoMetrics:
        """Score flat detections: image_ids (N,), boxes_xywh float64 (N, 4)
        COCO `[x, y, w, h]`, scores (N,), category_ids (N,) COCO ids. Their order
        breaks score ties, as the order of a results list does for pycocotools."""
        img_idx, img_ok = _lookup(self.image_ids, np.asarray(image_ids, dtype=np.int64))
        if not img_ok.all():
            unknown = np.unique(np.asarray(image_ids)[~img_ok])
            raise UserError(f"detections: {len(unknown)} image ids are not in the ground truth, e.g. "
                            f"{unknown[:10].tolist()} (evaluate against the annotations of their split)")
        cat_idx, cat_ok = _lookup(self.category_ids, np.asarray(category_ids, dtype=np.int64))
        known = np.flatnonzero(cat_ok)  # detections of unknown categories are ignored, as by pycocotools
        coords = np.ascontiguousarray(np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4).T)  # (4, N)
        dets = self._top_per_pair(img_idx=np.take(img_idx, known), cat_idx=np.take(cat_idx, known),
                                  coords=np.take(coords, known, axis=1),
                                  scores=np.take(np.asarray(scores, dtype=np.float64), known))
        edge_det, edge_gt, edge_iou = self._candidate_matches(dets)
        cand, match = _greedy_match(edge_det=edge_det, edge_gt=edge_gt, edge_iou=edge_iou, pair=dets["pair"],
                                    gt_crowd=self._gt_crowd, gt_ignored=self._gt_ignored)
        precision, recall = self._accumulate(dets, cand, match)
        return CocoMetrics.from_arrays(precision=precision, recall=recall, category_ids=self.category_ids)

    def _top_per_pair(self, *, img_idx: np.ndarray, cat_idx: np.ndarray, coords: np.ndarray,
                      scores: np.ndarray) -> dict[str, np.ndarray]:
        """The detections in (image, category, score desc, input order) order,
        each with its rank in its (image, category); the first 100 of each kept
        (COCOeval.computeIoU keeps maxDets[-1] per image and category). N each;
        "box" is (4, N) rows x, y, w, h."""
        order = np.lexsort((-scores, cat_idx, img_idx))  # stable: score ties keep their input order
        pair = np.take(img_idx, order) * len(self.category_ids) + np.take(cat_idx, order)
        rank = _rank_in_group(pair)
        top = rank < MAX_DETS[-1]
        kept = order[top]
        box = np.take(coords, kept, axis=1)  # (4, N)
        area = box[2] * box[3]  # (N,) loadRes: w * h
        return {
            "pair": pair[top],
            "rank": rank[top],
            "cat": np.take(cat_idx, kept),
            "box": box,
            "score": np.take(scores, kept),
            # (N, A): outside each area range, where an unmatched detection is ignored
            "outside": (area[:, None] < self._area_lo) | (area[:, None] > self._area_hi),
        }

    def _candidate_matches(self, dets: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(detection, ground truth) pairs of the same image and category with
        IoU >= 0.5 (no threshold below can match): det index (E,) ascending,
        gt index (E,), IoU float64 (E,)."""
        count = np.take(self._gt_pair_count, dets["pair"])  # (N,)
        start = np.take(self._gt_pair_start, dets["pair"])
        det = np.repeat(np.arange(len(count)), count)  # (P,) every same-pair (det, gt)
        offset = np.cumsum(count) - count
        gt = np.repeat(start - offset, count) + np.arange(int(count.sum()))
        iou = _coco_box_iou(np.take(dets["box"], det, axis=1), np.take(self._gt_box, gt, axis=1),
                            crowd=np.take(self._gt_crowd, gt))
        near = iou >= _MATCH_THRESHOLDS[0]
        return det[near], gt[near], iou[near]

    def _accumulate(self, dets: dict[str, np.ndarray], cand: np.ndarray,
                    match: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """COCOeval.accumulate: precision (T, R, K, A, M) and recall (T, K, A, M).

        cand (C,): the detections that have a candidate match; match (C, A, T):
        the ground truth each one matched, or -1. Every other detection is a
        false positive unless it lies outside the area range.
        """
        T, R, K, A = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(self.category_ids), len(AREA_RANGES)
        precision = -np.ones((T, R, K, A, len(MAX_DETS)))
        recall = -np.ones((T, K, A, len(MAX_DETS)))

        # pycocotools concatenates a category's detections image by image (each
        # image's in rank order) and stable-sorts them by score; dets are in
        # (image, category, rank) order, so this is (category, score desc, image, rank).
        acc = np.lexsort((-dets["score"], dets["cat"]))  # (N,) accumulation order
        acc_pos = np.empty_like(acc)
        acc_pos[acc] = np.arange(len(acc))
        cat_start = np.searchsorted(dets["cat"][acc], np.arange(K))  # (K,)
        is_cand = np.zeros(len(acc), dtype=bool)
        is_cand[cand] = True
        # No candidate match: a false positive unless outside the area range.
        plain_fp = ~np.take(is_cand, acc)[:, None] & ~np.take(dets["outside"], acc, axis=0)  # (N, A)
        rank = np.take(dets["rank"], acc)

        by_acc = np.argsort(np.take(acc_pos, cand))
        cand, match = np.take(cand, by_acc), np.take(match, by_acc, axis=0)  # in accumulation order
        c_pos = np.take(acc_pos, cand)
        c_cat = np.take(dets["cat"], cand)
        c_cat_start = np.searchsorted(c_cat, np.arange(K))  # (K,)
        c_rank = np.take(dets["rank"], cand)
        hit = match >= 0  # (C, A, T)
        gt = np.where(hit, match, 0)
        true_hit = hit & np.take(self._gt_id_nonzero, gt)  # pycocotools' dtMatches != 0
        gt_ignored = np.take(self._gt_ignored.ravel(), gt * A + np.arange(A)[None, :, None])  # (C, A, T)
        ignored = (hit & gt_ignored) | (~true_hit & np.take(dets["outside"], cand, axis=0)[:, :, None])
        tp_all = true_hit & ~ignored  # (C, A, T)
        fp_all = ~true_hit & ~ignored

        first_tp = self._first_tp_for_recall  # (K, A, R)
        for a in range(A):
            has_gt = self._npig[:, a] > 0  # (K,) pycocotools leaves -1 where npig == 0
            for m, max_det in enumerate(MAX_DETS):
                plain_fp_cum = np.concatenate([[0], np.cumsum(plain_fp[:, a] & (rank < max_det))])  # (N+1,)
                in_top = (c_rank < max_det)[:, None]  # (C, 1)
                tp = tp_all[:, a, :] & in_top  # (C, T)
                fp = fp_all[:, a, :] & in_top
                tp_cum = np.concatenate([np.zeros((1, T), np.int64), np.cumsum(tp, axis=0)])  # (C+1, T)
                fp_cum = np.concatenate([np.zeros((1, T), np.int64), np.cumsum(fp, axis=0)])
                t_i, c_i = np.nonzero(tp.T)  # true positives, by threshold then accumulation order
                k_i = c_cat[c_i]
                # counts up to and including each true positive, within its category
                n_tp = tp_cum[c_i + 1, t_i] - tp_cum[c_cat_start[k_i], t_i]
                n_fp = (fp_cum[c_i + 1, t_i] - fp_cum[c_cat_start[k_i], t_i]
                        + plain_fp_cum[c_pos[c_i] + 1] - plain_fp_cum[cat_start[k_i]])
                tp_f = n_tp.astype(np.float64)
                pr = tp_f / (n_fp.astype(np.float64) + tp_f + _EPS)  # pycocotools' expression, same floats
                q, tp_total = _interpolated_precision(pr=pr, segment=t_i * K + k_i, n_segments=T * K,
                                                      first_tp=np.tile(first_tp[:, a, :], (T, 1)))
                q = q.reshape(T, K, R).transpose(0, 2, 1)  # (T, R, K)
                precision[:, :, has_gt, a, m] = q[:, :, has_gt]
                rec = tp_total.reshape(T, K).astype(np.float64) / np.maximum(self._npig[:, a], 1)  # (T, K)
                recall[:, has_gt, a, m] = rec[:, has_gt]
        return precision, recall


def _greedy_match(*, edge_det: np.ndarray, edge_gt: np.ndarray, edge_iou: np.ndarray, pair: np.ndarray,
                  gt_crowd: np.ndarray, gt_ignored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval.evaluateImg's greedy matching for all (image, category) pairs,
    area ranges and IoU thresholds at once.

    edge_*: (E,) candidate (det, gt, IoU) with dets indexing `pair` (N,), which
    is sorted with each pair's detections in rank order. gt_crowd (G,),
    gt_ignored (G, A). Within a pair a detection may only take what the better
    ones left, so step s matches the s-th candidate-holding detection of every
    pair. Returns cand (C,) the detections with a candidate, ascending, and
    match (C, A, T) the ground-truth index each one took, or -1.
    """
    A, T = gt_ignored.shape[1], len(_MATCH_THRESHOLDS)
    cand, edge_c = np.unique(edge_det, return_inverse=True)
    match = np.full((len(cand), A, T), -1, dtype=np.int64)
    if len(cand) == 0:
        return cand, match
    step = _rank_in_group(pair[cand])  # (C,) rank among the pair's candidate-holding detections
    # Preference within a detection: higher IoU first, ties to the later annotation.
    order = np.lexsort((-edge_gt, -edge_iou, edge_c, step[edge_c]))
    e_c, e_gt, e_iou = edge_c[order], edge_gt[order], edge_iou[order]
    bounds = np.searchsorted(step[e_c], np.arange(step.max() + 2))
    regular = ~gt_ignored  # (G, A)
    taken = np.zeros((len(gt_crowd), A, T), dtype=bool)  # matched non-crowd ground truth
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        c, g = e_c[lo:hi], e_gt[lo:hi]
        n = hi - lo
        starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])  # (D,) one group of edges per detection
        free = (e_iou[lo:hi, None] >= _MATCH_THRESHOLDS)[:, None, :] & (
            ~np.take(taken, g, axis=0) | np.take(gt_crowd, g)[:, None, None])  # (n, A, T) crowds: again
        is_regular = np.take(regular, g, axis=0)[:, :, None]  # (n, A, 1)
        pos = np.arange(n)[:, None, None]
        # First available edge in preference order, regular objects before ignored ones; n = none.
        first_regular = np.minimum.reduceat(np.where(free & is_regular, pos, n), starts, axis=0)  # (D, A, T)
        first_ignored = np.minimum.reduceat(np.where(free & ~is_regular, pos, n), starts, axis=0)
        first = np.where(first_regular < n, first_regular, first_ignored)
        chosen = np.take(np.append(g, -1), first)  # (D, A, T)
        match[c[starts]] = chosen
        d_i, a_i, t_i = np.nonzero(first < n)
        g_i = chosen[d_i, a_i, t_i]
        exclusive = ~np.take(gt_crowd, g_i)
        taken.reshape(-1)[(g_i[exclusive] * A + a_i[exclusive]) * T + t_i[exclusive]] = True
    return cand, match


def _interpolated_precision(*, pr: np.ndarray, segment: np.ndarray, n_segments: int,
                            first_tp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Interpolated precision at the recall thresholds from the true positives.

    pr (P,): precision at each true positive, grouped by `segment` (P,)
    (sorted; a segment = one threshold and category) in order; first_tp
    (S, R): the true-positive count that first reaches each recall threshold.
    pycocotools takes the running max of precision from the right and reads it
    at the first detection whose recall reaches the threshold; recall only
    grows at true positives and precision only falls between them, so that is
    the max of pr over the true positives from that one on (0 if never
    reached). Returns q (S, R) and the true positives per segment (S,).
    """
    n_tp = np.bincount(segment, minlength=n_segments)  # (S,)
    seg_start = np.cumsum(n_tp) - n_tp
    need = np.maximum(first_tp, 1)  # at recall 0: the best precision over all
    reached = need <= n_tp[:, None]  # (S, R)
    idx = seg_start[:, None] + np.minimum(need - 1, n_tp[:, None])  # (S, R) nondecreasing through the rows
    # Block r of a row: its true positives from idx[r] to idx[r+1]; the last runs to the next row.
    blocks = np.maximum.reduceat(np.append(pr, 0.0), idx.ravel()).reshape(idx.shape)
    blocks[~reached] = 0.0
    return np.maximum.accumulate(blocks[:, ::-1], axis=1)[:, ::-1], n_tp


def _recall_crossings(npig: np.ndarray) -> np.ndarray:
    """(K, A) regular-object counts -> (K, A, R) the smallest true-positive count
    c with c / npig >= each recall threshold, in pycocotools' floats (its
    np.searchsorted of tp / npig). Categories without objects get a count
    that is never reached."""
    K, A = npig.shape
    out = np.full((K, A, len(RECALL_THRESHOLDS)), np.iinfo(np.int64).max // 2, dtype=np.int64)
    for k, a in zip(*np.nonzero(npig > 0)):
        n = int(npig[k, a])
        out[k, a] = np.searchsorted(np.arange(n + 1, dtype=np.float64) / n, RECALL_THRESHOLDS, side="left")
    return out


def _coco_box_iou(dt: np.ndarray, gt: np.ndarray, *, crowd: np.ndarray) -> np.ndarray:
    """IoU of paired boxes given as rows x, y, w, h: dt (4, P), gt (4, P) ->
    (P,) float64, with the operations of pycocotools' bbIou (maskApi.c) in its
    order, so the same floats; over a crowd region the union is the detection's area."""
    dx, dy, dw, dh = dt
    gx, gy, gw, gh = gt
    w = np.minimum(dx + dw, gx + gw) - np.maximum(dx, gx)
    h = np.minimum(dy + dh, gy + gh) - np.maximum(dy, gy)
    overlap = (w > 0) & (h > 0)
    inter = w * h
    dt_area = dw * dh
    union = np.where(crowd, dt_area, dt_area + gw * gh - inter)
    return np.where(overlap, inter / np.where(overlap, union, 1.0), 0.0)


def _rank_in_group(keys: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal sorted keys (N,)."""
    new = np.ones(len(keys), dtype=bool)
    new[1:] = keys[1:] != keys[:-1]
    starts = np.flatnonzero(new)
    return np.arange(len(keys)) - starts[np.cumsum(new) - 1]


def _lookup(sorted_ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each value in `sorted_ids` (N,), and whether it is there at all."""
    idx = np.minimum(np.searchsorted(sorted_ids, values), max(len(sorted_ids) - 1, 0))
    ok = sorted_ids[idx] == values if len(sorted_ids) else np.zeros(len(values), dtype=bool)
    return idx, ok


def flatten_detections(detections_per_image: Mapping[int, Detections], categories: CategoryMap
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-image detections -> flat (image_ids (N,), boxes_xywh float64 (N, 4),
    scores float64 (N,), category_ids (N,)), images in the mapping's order,
    detections in their own order. xywh computed in float64 from the float32
    corners (COCO's `[x, y, w, h]`, w = x2 - x1)."""
    items = list(detections_per_image.items())
    counts = [len(d.scores) for _, d in items]
    image_ids = np.repeat(np.array([i for i, _ in items], dtype=np.int64), counts)
    if not items or sum(counts) == 0:
        return image_ids, np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)
    boxes = np.concatenate([np.asarray(d.boxes) for _, d in items]).astype(np.float64).reshape(-1, 4)
    scores = np.concatenate([np.asarray(d.scores) for _, d in items]).astype(np.float64)
    labels = np.concatenate([np.asarray(d.labels) for _, d in items]).astype(np.int64)
    boxes_xywh = box_xyxy_to_xywh(torch.from_numpy(boxes)).numpy()  # float64: w = x2 - x1 exactly as COCO reads it
    return image_ids, boxes_xywh, scores, categories.category_ids(labels)
