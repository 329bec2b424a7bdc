"""Pascal VOC detection AP per class and its mean, by the VOC devkit's rules.

    metrics = voc_eval(gt, detections)      # gt: COCO json path / dict / COCO; detections: COCO results
    metrics.mean_ap_11_point, metrics.mean_ap_all_point, metrics.ap_all_point[category_id]

Two APs from one matching:
- `ap_11_point`: VOC2007's 11-point interpolated AP, the mean over
  t in 0, 0.1, ..., 1 of the best precision at recall >= t (0 when recall
  never reaches t). The thresholds are the devkit Python port's
  `np.arange(0., 1.1, 0.1)` floats, so 0.3, 0.6 and 0.7 are one ulp above
  their decimal value and a recall of exactly 3/10 does not reach "0.3"; kept
  so that the numbers equal the devkit's bit for bit.
- `ap_all_point`: VOC2010+'s area under the monotone precision envelope,
  summed where recall changes.

Matching, per class (the devkit's voc_eval / VOCevaldet):
- detections sorted by score, descending, stably (ties keep their input
  order, as MATLAB's sort in VOCevaldet does);
- each detection takes the ground truth of its image and class with the
  highest IoU, matched or not (the first in annotation order on ties);
- IoU > 0.5, strictly (`ovmax > ovthresh`): a difficult ground truth makes
  the detection neither TP nor FP (and may be hit again); a regular one is a
  TP the first time, a FP afterwards (a duplicate); IoU <= 0.5 or no ground
  truth in the image: FP;
- npos, the recall's denominator, counts the non-difficult ground truth.

Coordinates: the devkit's IoU works on 1-based inclusive pixel indices with
+1 widths. Continuous [x1, y1, x2, y2] (the project's boxes) is inclusive
[x1 + 1, y1 + 1, x2, y2] (`box_xyxy_to_voc_inclusive`), whose devkit width
x2 - (x1 + 1) + 1 is x2 - x1. The IoU is computed on the inclusive boxes with
the devkit's formula, operation for operation, so that ties and the 0.5
boundary come out as in the devkit.

Difficult ground truth: an annotation is difficult when its `difficult` key
is 1 (ion.data.voc writes it), else when `iscrowd` is 1, so COCO crowd regions
are ignored in the same way.

Classes with no non-difficult ground truth (npos = 0): the devkit divides by
zero (NaN or 0). Here they have no AP: they are left out of `ap_11_point` and
`ap_all_point` and out of both means, which average the classes with ground
truth (as the project's COCO metrics do); with no such class the means are -1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ion.errors import UserError
from ion.evaluation.coco_eval import Results, _load_results
from ion.evaluation.ground_truth import GroundTruth, load_coco_dataset

__all__ = ["VocMetrics", "voc_eval", "voc_match_class", "precision_recall", "ap_11_point", "ap_all_point",
           "box_xyxy_to_voc_inclusive", "box_xywh_to_voc_inclusive", "voc_box_iou_inclusive"]

IOU_THRESHOLD = 0.5
# The devkit Python port's thresholds, these exact floats (module docstring).
RECALL_POINTS_11 = np.arange(0., 1.1, 0.1)  # (11,)


@dataclass(frozen=True)
class VocMetrics:
    """VOC detection AP of one set of detections.

    ap_11_point, ap_all_point: category id -> AP, for the categories with
        non-difficult ground truth; mean_ap_11_point, mean_ap_all_point: their
        means (-1 when no category has ground truth); num_positives: category id
        -> npos, for every category of the ground truth.
    """

    ap_11_point: dict[int, float]
    ap_all_point: dict[int, float]
    mean_ap_11_point: float
    mean_ap_all_point: float
    num_positives: dict[int, int]

    def flat(self) -> dict[str, float]:
        """The means and `AP_voc07/category/<id>`, `AP_voc12/category/<id>` in one flat dict, for logging."""
        out = {"mAP_voc07": self.mean_ap_11_point, "mAP_voc12": self.mean_ap_all_point}
        out.update({f"AP_voc07/category/{c}": ap for c, ap in self.ap_11_point.items()})
        out.update({f"AP_voc12/category/{c}": ap for c, ap in self.ap_all_point.items()})
        return out


def box_xyxy_to_voc_inclusive(boxes: np.ndarray) -> np.ndarray:
    """Continuous [x1, y1, x2, y2] -> VOC inclusive [x1 + 1, y1 + 1, x2, y2]. ndarray (N, 4) -> float64 (N, 4)."""
    out = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    out[:, :2] += 1.0
    return out


def box_xywh_to_voc_inclusive(boxes: np.ndarray) -> np.ndarray:
    """COCO [x, y, w, h] -> VOC inclusive [x + 1, y + 1, x + w, y + h]. ndarray (N, 4) -> float64 (N, 4)."""
    b = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0] + 1.0, b[:, 1] + 1.0, b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1)


def voc_box_iou_inclusive(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """The devkit's IoU of paired inclusive boxes, elementwise. float64 (P, 4), (P, 4) -> (P,).

    The same operations in the same order as voc_eval, so the same floats.
    """
    iw = np.maximum(np.minimum(gt[:, 2], boxes[:, 2]) - np.maximum(gt[:, 0], boxes[:, 0]) + 1., 0.)
    ih = np.maximum(np.minimum(gt[:, 3], boxes[:, 3]) - np.maximum(gt[:, 1], boxes[:, 1]) + 1., 0.)
    inters = iw * ih
    uni = ((boxes[:, 2] - boxes[:, 0] + 1.) * (boxes[:, 3] - boxes[:, 1] + 1.)
           + (gt[:, 2] - gt[:, 0] + 1.) * (gt[:, 3] - gt[:, 1] + 1.) - inters)
    return inters / uni


def voc_match_class(*, det_images: np.ndarray, det_scores: np.ndarray, det_boxes: np.ndarray,
                    gt_images: np.ndarray, gt_boxes: np.ndarray, gt_difficult: np.ndarray,
                    iou_threshold: float = IOU_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """One class's detections matched by the devkit's rules (module docstring).

    det_images int (N,), det_scores float (N,), det_boxes float64 (N, 4)
    inclusive; gt_images int (G,), gt_boxes float64 (G, 4) inclusive,
    gt_difficult bool (G,), each image's ground truth in annotation order.
    Returns tp, fp: bool (N,) in score order (descending, stable); a detection
    on difficult ground truth is neither.
    """
    order = np.argsort(-np.asarray(det_scores, dtype=np.float64), kind="stable")  # (N,)
    det_images, det_boxes = np.asarray(det_images)[order], np.asarray(det_boxes, dtype=np.float64)[order]
    n = len(order)
    gt_order = np.argsort(gt_images, kind="stable")  # (G,) by image, annotation order kept
    gt_sorted_images = np.asarray(gt_images)[gt_order]
    # Each detection's candidates: the ground truth of its image, gt_order[start:end].
    start = np.searchsorted(gt_sorted_images, det_images, side="left")  # (N,)
    count = np.searchsorted(gt_sorted_images, det_images, side="right") - start  # (N,)
    pair_det = np.repeat(np.arange(n), count)  # (P,)
    pair_pos = np.arange(len(pair_det)) - np.repeat(np.cumsum(count) - count, count)  # (P,) 0.. within image
    pair_gt = gt_order[np.repeat(start, count) + pair_pos]  # (P,) original gt index
    overlaps = voc_box_iou_inclusive(det_boxes[pair_det], np.asarray(gt_boxes, dtype=np.float64)[pair_gt])

    has_gt = count > 0
    seg_start = (np.cumsum(count) - count)[has_gt]  # (N',) first pair of each detection with candidates
    ovmax = np.full(n, -np.inf)
    jmax = np.full(n, -1)
    if len(pair_det):
        ovmax[has_gt] = np.maximum.reduceat(overlaps, seg_start)
        # np.argmax's rule: the first candidate (annotation order) reaching the maximum.
        first = np.where(overlaps == ovmax[pair_det], pair_pos, np.iinfo(np.int64).max)
        best = np.minimum.reduceat(first, seg_start)  # (N',)
        jmax[has_gt] = gt_order[start[has_gt] + best]

    hit = ovmax > iou_threshold  # (N,)
    difficult = np.zeros(n, dtype=bool)
    difficult[hit] = np.asarray(gt_difficult, dtype=bool)[jmax[hit]]
    claims = np.flatnonzero(hit & ~difficult)  # score order
    _, first_claim = np.unique(jmax[claims], return_index=True)  # the first detection on each gt wins
    tp = np.zeros(n, dtype=bool)
    tp[claims[first_claim]] = True
    fp = ~tp & ~(hit & difficult)
    return tp, fp


def precision_recall(tp: np.ndarray, fp: np.ndarray, num_positives: int) -> tuple[np.ndarray, np.ndarray]:
    """The devkit's recall and precision after each detection. bool (N,), bool (N,) -> float64 (N,), (N,).

    num_positives > 0 (npos: non-difficult ground truth).
    """
    tp_cum = np.cumsum(tp, dtype=np.float64)
    fp_cum = np.cumsum(fp, dtype=np.float64)
    recall = tp_cum / float(num_positives)
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    return recall, precision


def ap_11_point(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007 11-point interpolated AP. float (N,), float (N,) -> float."""
    recall, precision = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    reached = recall[None, :] >= RECALL_POINTS_11[:, None]  # (11, N)
    best = np.max(np.where(reached, precision[None, :], 0.0), axis=1, initial=0.0)  # (11,)
    ap = 0.0
    for p in best:  # the devkit's running sum, for its floats
        ap = ap + p / 11.
    return float(ap)


def ap_all_point(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2010+ AP: the area under the monotone precision envelope. float (N,), float (N,) -> float."""
    mrec = np.concatenate(([0.], np.asarray(recall, dtype=np.float64), [1.]))
    mpre = np.concatenate(([0.], np.asarray(precision, dtype=np.float64), [0.]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope: best precision at any higher recall
    i = np.flatnonzero(mrec[1:] != mrec[:-1])  # where recall changes
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def voc_eval(gt: GroundTruth, detections: Results, *, iou_threshold: float = IOU_THRESHOLD) -> VocMetrics:
    """VOC AP of COCO-format `detections` against COCO-format ground truth.

    gt: a COCO json path, its dict or a pycocotools COCO (difficult flags as in
    the module docstring). detections: COCO results, a list of {"image_id",
    "category_id", "bbox": [x, y, w, h] continuous, "score"} or a results JSON
    path. Detections of categories absent from the ground truth are ignored (as
    pycocotools does); unknown image ids raise UserError.
    """
    dataset = load_coco_dataset(gt)
    results = _load_results(detections)
    image_ids = {int(img["id"]) for img in dataset["images"]}
    unknown = sorted({r["image_id"] for r in results} - image_ids)
    if unknown:
        raise UserError(f"{'detections' if isinstance(detections, list) else detections}: {len(unknown)} image "
                        f"ids are not in the ground truth, e.g. {unknown[:10]} (evaluate against the annotations "
                        f"of the split they came from)")
    anns = dataset["annotations"]
    gt_cat = np.array([a["category_id"] for a in anns], dtype=np.int64)  # (G,)
    gt_img = np.array([a["image_id"] for a in anns], dtype=np.int64)  # (G,)
    gt_box = box_xywh_to_voc_inclusive(np.array([a["bbox"] for a in anns], dtype=np.float64))  # (G, 4)
    gt_diff = np.array([bool(a.get("difficult", a.get("iscrowd", 0))) for a in anns], dtype=bool)  # (G,)
    det_cat = np.array([r["category_id"] for r in results], dtype=np.int64)  # (N,)
    det_img = np.array([r["image_id"] for r in results], dtype=np.int64)  # (N,)
    det_box = box_xywh_to_voc_inclusive(np.array([r["bbox"] for r in results], dtype=np.float64))  # (N, 4)
    det_score = np.array([r["score"] for r in results], dtype=np.float64)  # (N,)

    ap11, ap_all, npos_of = {}, {}, {}
    for cat_id in sorted(int(c["id"]) for c in dataset["categories"]):
        g, d = gt_cat == cat_id, det_cat == cat_id
        npos = int(np.count_nonzero(g & ~gt_diff))
        npos_of[cat_id] = npos
        if npos == 0:
            continue
        tp, fp = voc_match_class(det_images=det_img[d], det_scores=det_score[d], det_boxes=det_box[d],
                                 gt_images=gt_img[g], gt_boxes=gt_box[g], gt_difficult=gt_diff[g],
                                 iou_threshold=iou_threshold)
        recall, precision = precision_recall(tp, fp, npos)
        ap11[cat_id] = ap_11_point(recall, precision)
        ap_all[cat_id] = ap_all_point(recall, precision)
    return VocMetrics(ap_11_point=ap11, ap_all_point=ap_all, mean_ap_11_point=_mean(ap11),
                      mean_ap_all_point=_mean(ap_all), num_positives=npos_of)


def _mean(aps: dict[int, float]) -> float:
    return float(np.mean(list(aps.values()))) if aps else -1.0
