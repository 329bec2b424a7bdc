"""Proposal recall: average recall (AR) over IoU 0.5:0.95 and recall at IoU
0.5 and 0.7, at N proposals per image, overall and per COCO object size
(the figures of the Appendix, item 2: RPN1 44.1%, RPN2 44.3%, selective
search 41.7%, MCG 51.6% AR).

Definition (Hosang et al., "What makes for effective detection proposals?",
TPAMI 2016): a ground-truth box is recalled at threshold t with N proposals
when its best IoU with any of the first N proposals of its image is >= t;
no one-to-one matching (COCO's detection AR matches greedily one-to-one, so
it can only be lower: one proposal there covers one object). Recall at t is
the fraction of ground-truth boxes recalled; AR is its mean over the ten
thresholds 0.5, 0.55, ..., 0.95 (the discretised 2 * integral of recall over
[0.5, 1]). "First N" is the store order: best score first for a single
source, the rank-interleaved order for a mix (proposals/mix.py).

Crowd ground truth (iscrowd = 1) is excluded. Sizes follow COCO's ranges on
the annotation's `area` (the segment area, as COCO's evaluation uses; the box
area when a record has none), half-open so each object has one size:
small [0, 32^2), medium [32^2, 96^2), large [96^2, inf).
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ion.errors import UserError
from ion.figures import save_png
from ion.ops.box_ops import box_iou, box_xywh_to_xyxy
from proposals.store import ProposalStore

IOU_THRESHOLDS = np.round(np.linspace(0.5, 0.95, 10), 2)  # 0.5, 0.55, ..., 0.95 exactly as written
SIZE_RANGES = {
    "all": (0.0, np.inf),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, np.inf),
}


@dataclass(frozen=True)
class GroundTruth:
    """One image's ground truth: boxes float32 (G, 4) xyxy, areas float64 (G,), iscrowd bool (G,)."""

    boxes: np.ndarray
    areas: np.ndarray
    iscrowd: np.ndarray


def load_ground_truth(annotation_file: Union[str, Path]) -> dict[int, GroundTruth]:
    """Ground truth per image id from a COCO annotation file; images without
    annotations get empty arrays."""
    annotation_file = Path(annotation_file)
    try:
        coco = json.loads(annotation_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{annotation_file}: cannot read the COCO annotations ({err}); rerun the data stage") \
            from None
    per_image: dict[int, list[dict]] = {int(image["id"]): [] for image in coco.get("images", [])}
    for ann in coco.get("annotations", []):
        per_image.setdefault(int(ann["image_id"]), []).append(ann)
    ground_truth = {}
    for image_id, anns in per_image.items():
        xywh = torch.tensor([ann["bbox"] for ann in anns], dtype=torch.float32).reshape(-1, 4)  # (G, 4)
        boxes = box_xywh_to_xyxy(xywh).numpy()
        box_areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        areas = np.array([ann.get("area", box_areas[i]) for i, ann in enumerate(anns)], dtype=np.float64)
        iscrowd = np.array([bool(ann.get("iscrowd", 0)) for ann in anns], dtype=bool)
        ground_truth[image_id] = GroundTruth(boxes=boxes, areas=areas, iscrowd=iscrowd)
    return ground_truth


def box_iou_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 (A, B) IoU of xyxy boxes a (A, 4) and b (B, 4) (ion.ops.box_ops.box_iou
    in float64, so thresholds such as 0.7 compare exactly); 0 where the union is empty."""
    a = torch.as_tensor(np.asarray(a, dtype=np.float64).reshape(-1, 4))
    b = torch.as_tensor(np.asarray(b, dtype=np.float64).reshape(-1, 4))
    return torch.nan_to_num(box_iou(a, b), nan=0.0).numpy()


def best_overlaps(gt_boxes: np.ndarray, proposals: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """float64 (C, G): for each count n and ground-truth box, its best IoU among
    the first n proposals (all of them when there are fewer; 0 with none).
    gt_boxes: (G, 4) xyxy; proposals: (P, 4) xyxy, in order."""
    gt_boxes = np.asarray(gt_boxes).reshape(-1, 4)
    out = np.zeros((len(counts), len(gt_boxes)))
    if len(proposals) == 0 or len(gt_boxes) == 0:
        return out
    iou = box_iou_numpy(proposals, gt_boxes)  # (P, G)
    running_best = np.maximum.accumulate(iou, axis=0)  # (P, G): best among the first p + 1
    rows = np.minimum(np.asarray(counts), len(proposals)) - 1  # (C,)
    return running_best[rows]


@dataclass(frozen=True)
class RecallResult:
    """recall[size]: float64 (C, T), the fraction of that size's non-crowd
    ground truth recalled with counts[c] proposals at IoU thresholds[t]."""

    counts: tuple[int, ...]
    thresholds: np.ndarray
    recall: dict[str, np.ndarray]
    num_gt: dict[str, int]

    def _row(self, count: int) -> int:
        if count not in self.counts:
            raise KeyError(f"recall was computed at {self.counts} proposals, not {count}")
        return self.counts.index(count)

    def average_recall(self, count: int, size: str = "all") -> float:
        return float(self.recall[size][self._row(count)].mean())

    def recall_at(self, iou: float, count: int, size: str = "all") -> float:
        t = int(np.flatnonzero(np.isclose(self.thresholds, iou))[0])
        return float(self.recall[size][self._row(count), t])

    def ar_curve(self, size: str = "all") -> np.ndarray:
        """float64 (C,): AR at each of `counts`."""
        return self.recall[size].mean(axis=1)

    def metrics(self, counts: Sequence[int], prefix: str = "") -> dict[str, float]:
        """Flat metrics for MLflow: {prefix}AR@N, AR_small@N, AR_medium@N,
        AR_large@N, R50@N, R70@N for each N in `counts`."""
        out = {}
        for n in counts:
            out[f"{prefix}AR@{n}"] = self.average_recall(n)
            for size in ("small", "medium", "large"):
                out[f"{prefix}AR_{size}@{n}"] = self.average_recall(n, size)
            out[f"{prefix}R50@{n}"] = self.recall_at(0.5, n)
            out[f"{prefix}R70@{n}"] = self.recall_at(0.7, n)
        return out

    def to_json(self) -> dict:
        return {
            "definition": "best IoU per non-crowd ground-truth box among the first N proposals "
                          "(Hosang et al.); AR = mean recall over IoU 0.5:0.05:0.95",
            "counts": list(self.counts),
            "thresholds": [float(t) for t in self.thresholds],
            "num_gt": dict(self.num_gt),
            "average_recall": {size: self.ar_curve(size).tolist() for size in self.recall},
            "recall_50": {size: self.recall[size][:, 0].tolist() for size in self.recall},
            "recall_70": {size: self.recall[size][:, 4].tolist() for size in self.recall},
        }


def curve_counts(counts: Sequence[int], points: int = 24) -> tuple[int, ...]:
    """`counts` plus about `points` log-spaced counts from 1 to max(counts), for the recall curve."""
    spaced = np.unique(np.round(np.geomspace(1, max(counts), points)).astype(int))
    return tuple(sorted(set(spaced.tolist()) | set(int(c) for c in counts)))


def evaluate_recall(
    ground_truth: Mapping[int, GroundTruth],
    proposals_of: Callable[[int], np.ndarray],
    image_ids: Iterable[int],
    counts: Sequence[int],
) -> RecallResult:
    """Recall of the proposals `proposals_of(image_id)` -> (P, 4) xyxy, in
    order, over `image_ids` (module doc). Images missing from `ground_truth`
    count as having no objects."""
    counts = tuple(int(c) for c in counts)
    best_parts, area_parts = [], []
    for image_id in image_ids:
        gt = ground_truth.get(int(image_id))
        if gt is None or not (~gt.iscrowd).any():
            continue
        keep = ~gt.iscrowd
        best_parts.append(best_overlaps(gt.boxes[keep], proposals_of(int(image_id)), counts))  # (C, G_i)
        area_parts.append(gt.areas[keep])
    best = np.concatenate(best_parts, axis=1) if best_parts else np.zeros((len(counts), 0))  # (C, G)
    areas = np.concatenate(area_parts) if area_parts else np.zeros(0)
    recalled = best[:, :, None] >= IOU_THRESHOLDS[None, None, :]  # (C, G, T)
    recall, num_gt = {}, {}
    for size, (low, high) in SIZE_RANGES.items():
        in_range = (areas >= low) & (areas < high)
        num_gt[size] = int(in_range.sum())
        recall[size] = recalled[:, in_range].mean(axis=1) if in_range.any() \
            else np.zeros((len(counts), len(IOU_THRESHOLDS)))
    return RecallResult(counts=counts, thresholds=IOU_THRESHOLDS.copy(), recall=recall, num_gt=num_gt)


def plot_recall(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], path: Union[str, Path],
                title: str = "Average recall vs number of proposals") -> Path:
    """Write a PNG of AR against the number of proposals (log axis), one line per
    source: curves[source] = (counts, ar)."""
    path = Path(path)
    figure = Figure(figsize=(6.0, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for source, (counts, ar) in curves.items():
        axes.plot(list(counts), list(ar), marker=".", label=source)
    axes.set_xscale("log")
    axes.set_xlabel("proposals per image")
    axes.set_ylabel("average recall (IoU 0.5:0.95)")
    axes.set_ylim(0.0, 1.0)
    axes.grid(True, which="both", alpha=0.3)
    axes.set_title(title)
    if curves:
        axes.legend(loc="upper left")
    return save_png(figure, path)


def store_recall(store: ProposalStore, ground_truth: Mapping[int, GroundTruth],
                 counts: Sequence[int]) -> RecallResult:
    """Recall of every image of a proposal store (proposals/store.py) against
    `ground_truth`, which must not hold annotated images the store lacks."""
    lacking = [i for i, gt in ground_truth.items() if (~gt.iscrowd).any() and i not in store]
    if lacking:
        raise ValueError(f"{store.path}: no proposals for {len(lacking)} annotated images, e.g. {lacking[:5]}")
    return evaluate_recall(ground_truth, lambda image_id: store.get(image_id)[0], store.image_ids, counts)
