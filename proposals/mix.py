"""Mixed proposal sets: per image, the top-k boxes of each source by its own
score, concatenated and de-duplicated (Appendix item 2: train on 1000 RPN1 +
1000 MCG boxes, test on 1000 RPN2 + 2000 MCG).

Scores of different sources are not comparable, so the mix is not re-sorted
by score. Its order interleaves the sources by rank relative to their quota:
a box of rank r in a source with quota k sits at position r / k, ties going
to the source named first. The first N boxes of a mix therefore hold about
N * k_s / sum(k) boxes of each source, which keeps "recall at N proposals"
meaningful for mixed sets and lets a consumer truncate a mix without dropping
a source. Each box keeps its source's score and the index of its source.

De-duplication walks the boxes in mix order and keeps the first of equal
boxes (the better-ranked one); with `dedup_iou` < 1 a box is also dropped when
its IoU with an earlier kept box is above `dedup_iou` (greedy, like NMS in mix
order). `dedup_iou` = 1 drops exact duplicates only.
"""
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torchvision.ops import nms

from proposals.store import ProposalStore


def top_k_by_score(scores: np.ndarray, k: int) -> np.ndarray:
    """int64 (min(k, N),): indices of the k highest scores, best first; equal
    scores keep their stored order."""
    order = np.argsort(-scores, kind="stable")
    return order[:k]


def first_unique(boxes: np.ndarray) -> np.ndarray:
    """int64 (U,): ascending indices of the first occurrence of each distinct box row.
    boxes: float32 (N, 4)."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    # + 0.0 turns -0.0 into 0.0, so a box clipped at the border equals its unclipped twin;
    # after that, finite float32 rows are equal exactly when their bytes are. Each row's
    # 16 bytes as two uint64 keys: a stable lexsort groups equal rows with their first
    # occurrence leading, the same answer as np.unique(axis=0, return_index=True) at
    # a fraction of its cost (it sorts a structured copy of the rows).
    rows = np.ascontiguousarray(boxes + np.float32(0.0), dtype=np.float32).view(np.uint64)  # (N, 2)
    order = np.lexsort((rows[:, 1], rows[:, 0]))  # (N,) stable: equal rows keep index order
    ranked = rows[order]
    starts = np.empty(len(ranked), dtype=bool)
    starts[0] = True
    np.any(ranked[1:] != ranked[:-1], axis=1, out=starts[1:])
    return np.sort(order[starts]).astype(np.int64)


def first_non_overlapping(boxes: np.ndarray, iou: float) -> np.ndarray:
    """int64 (U,): ascending indices of the boxes kept when walking in order and
    dropping each box whose IoU with an earlier kept box is above `iou`.
    boxes: float32 (N, 4) xyxy."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    # nms keeps by decreasing score: decreasing positions make it walk in order.
    rank_scores = torch.arange(len(boxes), 0, -1, dtype=torch.float32)
    keep = nms(torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)), rank_scores, iou)
    return np.sort(keep.numpy().astype(np.int64))


def mix_image(
    per_source: Sequence[tuple[np.ndarray, np.ndarray]],
    top_k: Sequence[int],
    dedup_iou: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mix one image's proposals.

    per_source: for each source, (boxes float32 (N_s, 4) xyxy, scores float32 (N_s,)).
    top_k: the quota of each source, same order.
    Returns boxes float32 (M, 4), scores float32 (M,) (each box's own source's
    score) and sources int8 (M,) (index into per_source), in mix order (module doc).
    """
    assert len(per_source) == len(top_k), "one quota per source"
    boxes, scores, sources, keys = [], [], [], []
    for s, ((source_boxes, source_scores), k) in enumerate(zip(per_source, top_k)):
        chosen = top_k_by_score(np.asarray(source_scores, dtype=np.float32), k)
        boxes.append(np.asarray(source_boxes, dtype=np.float32).reshape(-1, 4)[chosen])
        scores.append(np.asarray(source_scores, dtype=np.float32)[chosen])
        sources.append(np.full(len(chosen), s, dtype=np.int8))
        keys.append(np.arange(len(chosen), dtype=np.float64) / k)
    boxes_all = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)  # (sum N, 4)
    scores_all = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    sources_all = np.concatenate(sources) if sources else np.zeros(0, np.int8)
    keys_all = np.concatenate(keys) if keys else np.zeros(0)
    order = np.lexsort((sources_all, keys_all))  # by rank / quota, then by source
    boxes_all, scores_all, sources_all = boxes_all[order], scores_all[order], sources_all[order]

    keep = first_unique(boxes_all)
    boxes_all, scores_all, sources_all = boxes_all[keep], scores_all[keep], sources_all[keep]
    if dedup_iou < 1.0:
        keep = first_non_overlapping(boxes_all, dedup_iou)
        boxes_all, scores_all, sources_all = boxes_all[keep], scores_all[keep], sources_all[keep]
    return boxes_all, scores_all, sources_all


def mix_stores(
    stores: Mapping[str, ProposalStore],
    top_k: Mapping[str, int],
    image_ids: Iterable[int],
    dedup_iou: float = 1.0,
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Items (image_id, boxes, scores, sources) for `write_store`, mixing the
    sources named in `top_k` (in its order: source index s is the s-th key)
    for each image. Write them with attrs {"source_names": list(top_k)}."""
    names = list(top_k)
    missing = [name for name in names if name not in stores]
    assert not missing, f"no store for sources {missing}"
    quotas = [top_k[name] for name in names]
    for image_id in image_ids:
        per_source = [stores[name].get(image_id) for name in names]
        boxes, scores, sources = mix_image(per_source, quotas, dedup_iou)
        yield int(image_id), boxes, scores, sources
