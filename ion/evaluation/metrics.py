"""The COCO box-evaluation parameters and the metrics record both evaluators return.

The constants are pycocotools' `Params.setDetParams` (iouType "bbox"), built
the same way so that they are the same floats: the 12 summary stats are
compared with pycocotools to 1e-9, and a threshold off by one ulp would flip
matches.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# pycocotools: np.linspace, because np.arange's points land slightly above 0.55, 0.6, ...
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)  # (T,)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)  # (R,)
MAX_DETS = (1, 10, 100)
AREA_RANGES = ((0**2, 1e5**2), (0**2, 32**2), (32**2, 96**2), (96**2, 1e5**2))  # (A, 2), inclusive
AREA_LABELS = ("all", "small", "medium", "large")

# COCOeval.stats, in its order: (name, AP or AR, IoU threshold or None = all, area, max dets)
STAT_SPECS = (
    ("AP", True, None, "all", 100),
    ("AP50", True, 0.5, "all", 100),
    ("AP75", True, 0.75, "all", 100),
    ("APs", True, None, "small", 100),
    ("APm", True, None, "medium", 100),
    ("APl", True, None, "large", 100),
    ("AR1", False, None, "all", 1),
    ("AR10", False, None, "all", 10),
    ("AR100", False, None, "all", 100),
    ("ARs", False, None, "small", 100),
    ("ARm", False, None, "medium", 100),
    ("ARl", False, None, "large", 100),
)
STAT_NAMES = tuple(spec[0] for spec in STAT_SPECS)


@dataclass(frozen=True)
class CocoMetrics:
    """COCO box metrics of one set of detections.

    stats: the 12 COCO summary stats by name (STAT_NAMES), -1 where no
        ground truth falls in the setting (pycocotools' convention);
    per_category_ap: COCO category id -> AP@[.5:.95] (all areas, 100 dets),
        for the categories that have ground truth;
    per_size_ap: "small" / "medium" / "large" -> AP;
    precision: float64 (T, R, K, A, M) interpolated precision at IOU_THRESHOLDS x
        RECALL_THRESHOLDS x categories x AREA_LABELS x MAX_DETS, -1 = no ground truth;
    recall: float64 (T, K, A, M) final recall, -1 = no ground truth;
    category_ids: the K axis, sorted COCO ids.
    """

    stats: dict[str, float]
    per_category_ap: dict[int, float]
    per_size_ap: dict[str, float]
    precision: np.ndarray
    recall: np.ndarray
    category_ids: tuple[int, ...]

    @classmethod
    def from_arrays(cls, *, precision: np.ndarray, recall: np.ndarray, category_ids) -> CocoMetrics:
        """Everything from pycocotools' accumulated `precision` and `recall`."""
        stats = summarize(precision=precision, recall=recall)
        return cls(
            stats=stats,
            per_category_ap=_per_category_ap(precision, category_ids),
            per_size_ap={"small": stats["APs"], "medium": stats["APm"], "large": stats["APl"]},
            precision=precision,
            recall=recall,
            category_ids=tuple(int(c) for c in category_ids),
        )

    def flat(self) -> dict[str, float]:
        """The stats and `AP/category/<id>` in one flat dict, for metric logging."""
        out = dict(self.stats)
        out.update({f"AP/category/{cat_id}": ap for cat_id, ap in self.per_category_ap.items()})
        return out

    def pr_curve(self, *, iou: float = 0.5, area: str = "all", category_id: int | None = None) -> np.ndarray:
        """Interpolated precision at RECALL_THRESHOLDS (R,), at IoU threshold
        `iou` with 100 detections, for one category or averaged over the
        categories with ground truth (-1 where none has any)."""
        t = int(np.flatnonzero(np.isclose(IOU_THRESHOLDS, iou))[0])
        a = AREA_LABELS.index(area)
        curves = self.precision[t, :, :, a, MAX_DETS.index(100)]  # (R, K)
        if category_id is not None:
            return curves[:, self.category_ids.index(category_id)]
        present = curves[0] > -1  # (K,)
        return curves[:, present].mean(axis=1) if present.any() else np.full(curves.shape[0], -1.0)


def summarize(*, precision: np.ndarray, recall: np.ndarray) -> dict[str, float]:
    """COCOeval.summarize for bbox, without the printing: the mean over the
    settings with ground truth (> -1), -1 when there are none. Same slicing and
    the same np.mean as pycocotools, so the same floats."""
    stats = {}
    for name, is_ap, iou, area, max_dets in STAT_SPECS:
        a = [AREA_LABELS.index(area)]
        m = [MAX_DETS.index(max_dets)]
        s = precision if is_ap else recall
        if iou is not None:
            s = s[np.where(iou == IOU_THRESHOLDS)[0]]
        s = s[:, :, :, a, m] if is_ap else s[:, :, a, m]
        stats[name] = float(np.mean(s[s > -1])) if np.any(s > -1) else -1.0
    return stats


def _per_category_ap(precision: np.ndarray, category_ids) -> dict[int, float]:
    per_category = precision[:, :, :, AREA_LABELS.index("all"), MAX_DETS.index(100)]  # (T, R, K)
    out = {}
    for k, cat_id in enumerate(category_ids):
        s = per_category[:, :, k]
        if np.any(s > -1):
            out[int(cat_id)] = float(np.mean(s[s > -1]))
    return out
