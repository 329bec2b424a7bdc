"""The RPN's training targets and losses (Faster R-CNN, Ren et al. Sec. 3.1.2-3.1.3):
anchor labels, anchor sampling, and one image's loss terms for both heads."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ion.ops.box_ops import box_ioa, box_iou, encode_boxes
from proposals.rpn.config import RpnConfig
from proposals.rpn.model import RPN_BOX_WEIGHTS

# Anchor labels (named sentinels, as torchvision's Matcher).
POSITIVE = 1
NEGATIVE = 0
IGNORE = -1

# torchvision's RPN smooth-L1 transition point.
SMOOTH_L1_BETA = 1.0 / 9.0


def label_anchors(*, anchors: Tensor, gt_boxes: Tensor, gt_iscrowd: Tensor, pos_iou: float,
                  neg_iou: float, crowd_ioa: float) -> tuple[Tensor, Tensor]:
    """Faster R-CNN's anchor labels (Ren et al. Sec. 3.1.2).

    POSITIVE: IoU >= pos_iou with a non-crowd box, or the highest-IoU anchor(s)
    of a non-crowd box (ties all count; an IoU of 0 never makes a positive).
    NEGATIVE: IoU < neg_iou with every non-crowd box. IGNORE: the rest, and
    the negatives that lie inside a crowd box (intersection over the anchor's
    area >= crowd_ioa): a crowd region holds unlabelled objects, so it is
    neither object nor background (Detectron's crowd filter).

    anchors Tensor[M, 4], gt_boxes Tensor[G, 4], gt_iscrowd bool Tensor[G]
    -> labels int64 Tensor[M], matched int64 Tensor[M] (index of the non-crowd
    box each anchor is matched to, meaningful for positives).
    """
    M = anchors.shape[0]
    labels = torch.full((M,), IGNORE, dtype=torch.int64, device=anchors.device)
    matched = torch.zeros(M, dtype=torch.int64, device=anchors.device)
    objects = torch.nonzero(~gt_iscrowd).flatten()
    if objects.numel() == 0:
        labels[:] = NEGATIVE
    else:
        iou = box_iou(anchors, gt_boxes[objects])  # (M, G_objects)
        best_iou, best = iou.max(dim=1)  # (M,), (M,)
        matched = objects[best]
        labels[best_iou < neg_iou] = NEGATIVE
        labels[best_iou >= pos_iou] = POSITIVE
        # The highest-IoU anchors of each box are positive even below pos_iou,
        # so every object gets at least one; they take that box as target.
        gt_best = iou.max(dim=0).values  # (G_objects,)
        is_best = (iou == gt_best[None, :]) & (gt_best[None, :] > 0)  # (M, G_objects)
        anchor_idx, gt_idx = torch.nonzero(is_best, as_tuple=True)
        labels[anchor_idx] = POSITIVE
        matched[anchor_idx] = objects[gt_idx]
    crowd = torch.nonzero(gt_iscrowd).flatten()
    if crowd.numel() > 0:
        in_crowd = box_ioa(anchors, gt_boxes[crowd]).max(dim=1).values >= crowd_ioa  # (M,)
        labels[in_crowd & (labels == NEGATIVE)] = IGNORE
    return labels, matched


def sample_anchors(labels: Tensor, *, num: int, positive_fraction: float,
                   generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Random anchors for the loss: at most num * positive_fraction positives,
    negatives filling the rest of `num` (Ren et al. Sec. 3.1.3: 256, half).
    Drawn on the CPU from `generator`, or torch's global one when None (in
    training: seeded by ion/engine/ per image position, so the draw depends
    only on the seed and the position).
    labels int64 Tensor[M] -> (positive indices Tensor[p], negative indices Tensor[n])."""
    positive = torch.nonzero(labels == POSITIVE).flatten().cpu()
    negative = torch.nonzero(labels == NEGATIVE).flatten().cpu()
    num_pos = min(positive.numel(), int(num * positive_fraction))
    num_neg = min(negative.numel(), num - num_pos)
    pos = positive[torch.randperm(positive.numel(), generator=generator)[:num_pos]]
    neg = negative[torch.randperm(negative.numel(), generator=generator)[:num_neg]]
    return pos.to(labels.device), neg.to(labels.device)


def rpn_losses(*, logits: Tensor, deltas: Tensor, anchors: Tensor, gt_boxes: Tensor,
               gt_iscrowd: Tensor, cfg: RpnConfig,
               generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
    """One image's losses: binary cross-entropy on the sampled anchors'
    objectness, smooth L1 on the positive ones' deltas, both divided by the
    number of sampled anchors (torchvision's normalisation).

    logits Tensor[M], deltas Tensor[M, 4], anchors Tensor[M, 4], gt_boxes
    Tensor[G, 4], gt_iscrowd bool Tensor[G] -> {"objectness", "deltas"} scalars.
    """
    labels, matched = label_anchors(anchors=anchors, gt_boxes=gt_boxes, gt_iscrowd=gt_iscrowd,
                                    pos_iou=cfg.pos_iou, neg_iou=cfg.neg_iou, crowd_ioa=cfg.crowd_ioa)
    pos, neg = sample_anchors(labels, num=cfg.anchors_per_image,
                              positive_fraction=cfg.positive_fraction, generator=generator)
    sampled = torch.cat([pos, neg])
    targets = torch.cat([torch.ones(pos.numel()), torch.zeros(neg.numel())]).to(logits)
    count = max(sampled.numel(), 1)
    objectness = F.binary_cross_entropy_with_logits(logits[sampled], targets, reduction="sum") / count
    if pos.numel() > 0:
        target_deltas = encode_boxes(boxes=gt_boxes[matched[pos]], rois=anchors[pos], weights=RPN_BOX_WEIGHTS)
        box = F.smooth_l1_loss(deltas[pos], target_deltas, beta=SMOOTH_L1_BETA, reduction="sum") / count
    else:
        box = deltas.sum() * 0.0
    return {"objectness": objectness, "deltas": box}
