"""Raw test-time candidates of one image, before NMS: what the detect stage
stores and the tune stage sweeps NMS and voting thresholds over.

What `predict_raw` does, in the resized image:

1. Round 1 (Sec. 4.2, MR-CNN's iterative localisation): the proposals are
   scored (softmax, Tensor[P, K+1]) and regressed per class (Tensor[P, K, 4]).
   Candidate (p, k) is the proposal's class-k regressed box with the
   proposal's class-k score.
2. Round 2 (Appendix item 5, "the improved locations are passed again through
   the network"), `round2`:
   - "top_class": each proposal's round-1 box for its top-scoring foreground
     class becomes a new ROI; these P ROIs are scored and regressed again,
     giving candidates exactly as in round 1 (class-k box regressed from the
     new ROI, with the new ROI's class-k score). One ROI per proposal keeps
     round 2 as cheap as round 1 for K = 80.
   - "all_classes": MR-CNN's iterative localisation, which the paper follows:
     every class's round-1 box is re-scored, candidate (p, k) of round 2 being
     the class-k box regressed from ROI (p, k) with ROI (p, k)'s class-k
     score. Only the round-1 boxes that are candidates themselves (score >=
     score_thresh) are re-scored: the others could only add boxes whose class
     scored below the threshold once already, and there are up to P * K of them.
3. Both rounds' candidates are pooled; those with score >= score_thresh
   (0.05) are kept, mapped back to original-image coordinates and clipped.

Left-right flip (Appendix, post-competition item 2): the same ROIs are also
run on the mirrored image (ROIs mirrored), and per ROI the softmax scores and
the box deltas (mirrored back: dx negated) of both views are averaged before
boxes are decoded. With flip=True this happens in both rounds, so round 2 of
the "flip" set starts from the merged round-1 boxes. The backbone runs once
per view; both candidate sets share the unflipped round-1 pass.
"""
from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor

from ion.data.transforms import normalize_image, resize_image, resize_scale
from ion.engine.loop import AUTOCAST_DTYPES
from ion.modeling.detector import FeatureMaps, IONDetector
from ion.ops.box_ops import clip_boxes_xyxy, decode_boxes, flip_boxes_xyxy, flip_deltas

SCORE_THRESH = 0.05  # Sec. 4.1 / Fast R-CNN: candidates below this are never detections
ROI_CHUNK = 1000  # ROIs per skip-pool/fc pass: bounds memory at 4000 proposals on VGG16

Scored = tuple[Tensor, Tensor]  # (scores Tensor[R, K+1], deltas Tensor[R, K, 4])
Flat = tuple[Tensor, Tensor, Tensor]  # candidates: boxes Tensor[M, 4], scores Tensor[M], labels Tensor[M] in 1..K
Round2 = Literal["top_class", "all_classes"]


def predict_raw(model: IONDetector, image: np.ndarray, proposals: np.ndarray, *, min_size: int, max_size: int,
                flip: bool, score_thresh: float = SCORE_THRESH, two_rounds: bool = True,
                round2: Round2 = "top_class", amp: str = "off") -> dict[str, dict[str, np.ndarray]]:
    """Raw candidates of one image (see the module docstring).

    image: uint8 (H, W, 3) RGB; proposals: float32 (P, 4) `[x1, y1, x2, y2]`
    in original-image coordinates; two_rounds: False stops after round 1;
    round2: which round-1 boxes round 2 re-scores (module docstring);
    amp: "off", or the autocast dtype ("bf16", "fp16") of the network's passes
    on the model's device; scores and deltas are cast to float32 before boxes
    are decoded, merged and clipped.

    Returns {"plain": set} and, with flip=True, also {"flip": set}; each set is
    boxes float32 (M, 4) original-image coordinates, scores float32 (M,),
    labels int64 (M,) in 1..K, round int8 (M,) in {1, 2}.
    """
    H, W = image.shape[:2]
    proposals = np.asarray(proposals, dtype=np.float32).reshape(-1, 4)
    keys = ("plain", "flip") if flip else ("plain",)
    if proposals.shape[0] == 0:
        return {key: _empty() for key in keys}
    param = next(model.parameters())
    scale = resize_scale(height=H, width=W, min_size=min_size, max_size=max_size)
    resized = resize_image(image, scale=scale)
    h, w = resized.shape[:2]
    x = normalize_image(resized, mean=tuple(model.pixel_mean.tolist()), std=tuple(model.pixel_std.tolist()))
    x = x.to(device=param.device, dtype=param.dtype)  # (1, 3, h, w)
    rois = torch.from_numpy(proposals).to(device=param.device, dtype=param.dtype) * scale  # (P, 4)

    if round2 not in ("top_class", "all_classes"):
        raise ValueError(f"round2 must be 'top_class' or 'all_classes', got {round2!r}")
    frame = dict(height=h, width=w, weights=model.bbox_weights, two_rounds=two_rounds, round2=round2,
                 score_thresh=score_thresh)
    was_training = model.training
    model.eval()
    try:
        dtype = AUTOCAST_DTYPES[amp]
        with torch.inference_mode(), torch.autocast(param.device.type, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            maps = model.feature_maps(x)

            def plain(r: Tensor) -> Scored:
                return _score(model, maps, r)

            first = plain(rois)
            sets = {"plain": _rounds(rois, first=first, rescore=plain, **frame)}
            if flip:
                # Mirroring the normalised tensor equals normalising the mirrored image.
                maps_flipped = model.feature_maps(x.flip(-1))

                def merged(r: Tensor) -> Scored:
                    return _average(plain(r), _score_flipped(model, maps_flipped, r, width=w))

                first_merged = _average(first, _score_flipped(model, maps_flipped, rois, width=w))
                sets["flip"] = _rounds(rois, first=first_merged, rescore=merged, **frame)
    finally:
        model.train(was_training)
    return {key: _candidates(rounds, scale=scale, height=H, width=W) for key, rounds in sets.items()}


def _score(model: IONDetector, maps: FeatureMaps, rois: Tensor) -> Scored:
    """Softmax scores Tensor[R, K+1] and deltas Tensor[R, K, 4], in chunks of ROIs."""
    outs = [model.score_rois(maps, rois[i:i + ROI_CHUNK]) for i in range(0, rois.shape[0], ROI_CHUNK)]
    # Back to the ROIs' dtype: float32 under autocast's bf16/fp16.
    logits = torch.cat([o[0] for o in outs]).to(rois.dtype)  # (R, K+1)
    deltas = torch.cat([o[1] for o in outs]).to(rois.dtype)  # (R, K, 4)
    return logits.softmax(dim=1), deltas


def _score_flipped(model: IONDetector, maps_flipped: FeatureMaps, rois: Tensor, *, width: int) -> Scored:
    """`_score` of the mirrored ROIs on the mirrored image, deltas mirrored back."""
    scores, deltas = _score(model, maps_flipped, flip_boxes_xyxy(rois, width=float(width)))
    return scores, flip_deltas(deltas)


def _average(a: Scored, b: Scored) -> Scored:
    return (a[0] + b[0]) / 2, (a[1] + b[1]) / 2


def _rounds(rois: Tensor, *, first: Scored, rescore: Callable[[Tensor], Scored], height: int, width: int,
            weights: tuple[float, ...], two_rounds: bool, round2: Round2, score_thresh: float) -> list[Flat]:
    """The candidates (score >= score_thresh) of round 1 and, with two_rounds, of
    round 2, boxes decoded and clipped in the resized image."""
    frame = dict(height=height, width=width, weights=weights)
    scores1, deltas1 = first
    boxes1 = _decode(rois, deltas1, **frame)  # (P, K, 4)
    round1 = _above(boxes1, scores1, score_thresh)
    if not two_rounds:
        return [round1]
    if round2 == "top_class":
        top = scores1[:, 1:].argmax(dim=1)  # (P,) top foreground class, 0-based
        rois2 = boxes1[torch.arange(rois.shape[0], device=rois.device), top]  # (P, 4)
        scores2, deltas2 = rescore(rois2)
        return [round1, _above(_decode(rois2, deltas2, **frame), scores2, score_thresh)]
    # all_classes: ROI (p, k) is round 1's candidate box of class k; it keeps class k.
    rois2, labels = round1[0], round1[2]  # (M, 4), (M,) in 1..K
    if rois2.shape[0] == 0:
        return [round1, round1]  # no candidate, nothing to re-score: both rounds empty
    scores2, deltas2 = rescore(rois2)  # (M, K+1), (M, K, 4)
    rows = torch.arange(rois2.shape[0], device=rois2.device)
    boxes2 = _decode(rois2, deltas2[rows, labels - 1][:, None, :], **frame)[:, 0]  # (M, 4)
    score2 = scores2[rows, labels]  # (M,)
    keep = score2 >= score_thresh
    return [round1, (boxes2[keep], score2[keep], labels[keep])]


def _above(boxes: Tensor, scores: Tensor, score_thresh: float) -> Flat:
    """Candidates (p, k) with scores[p, k + 1] >= score_thresh from boxes Tensor[P, K, 4]
    and scores Tensor[P, K+1], in (p, k) order."""
    fg = scores[:, 1:]  # (P, K)
    keep = fg >= score_thresh  # (P, K)
    return boxes[keep], fg[keep], torch.nonzero(keep)[:, 1] + 1


def _decode(rois: Tensor, deltas: Tensor, *, height: int, width: int, weights: tuple[float, ...]) -> Tensor:
    """Class-specific boxes Tensor[R, K, 4] from ROIs Tensor[R, 4] and deltas Tensor[R, K, 4], clipped."""
    boxes = decode_boxes(deltas=deltas, rois=rois[:, None, :], weights=weights)  # (R, K, 4)
    return clip_boxes_xyxy(boxes, height=float(height), width=float(width))


def _candidates(rounds: list[Flat], *, scale: float, height: int, width: int) -> dict[str, np.ndarray]:
    """The candidates of all rounds, in original-image coordinates, with their round."""
    boxes, scores, labels, round_ids = [], [], [], []
    for i, (b, s, k) in enumerate(rounds):
        boxes.append(b)  # (M_i, 4)
        scores.append(s)
        labels.append(k)
        round_ids.append(torch.full((b.shape[0],), i + 1, dtype=torch.int8))
    out_boxes = clip_boxes_xyxy(torch.cat(boxes) / scale, height=float(height), width=float(width))
    return {
        "boxes": out_boxes.cpu().numpy().astype(np.float32),
        "scores": torch.cat(scores).cpu().numpy().astype(np.float32),
        "labels": torch.cat(labels).cpu().numpy().astype(np.int64),
        "round": torch.cat(round_ids).numpy(),
    }


def _empty() -> dict[str, np.ndarray]:
    return {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros((0,), np.float32),
            "labels": np.zeros((0,), np.int64), "round": np.zeros((0,), np.int8)}
