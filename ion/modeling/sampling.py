"""Training ROI sampling per image (Fast R-CNN, Sec. 4.1 of the paper).

The ground-truth boxes join the proposals; of these candidates, up to
`fg_fraction` of `rois_per_image` are foreground (IoU >= fg_iou with a
ground-truth box), the rest background (max IoU in [bg_iou_lo, bg_iou_hi)),
each drawn without replacement from a `torch.Generator` the caller seeds.

Crowd boxes (COCO `iscrowd`) are not objects to detect: they are never
foreground targets and never join the candidates. A candidate with at least
`crowd_ioa` of its area inside a crowd box is not used as background either,
since it may well show the crowd's category (Detectron's rule); it can still be
foreground for a non-crowd box it overlaps.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ion.ops.box_ops import box_ioa, box_iou, encode_boxes


class RoiSample(NamedTuple):
    """rois Tensor[R, 4] (foreground first), labels Tensor[R] int64 (0 = background,
    1..K), box_targets Tensor[R, 4] (zeros for background)."""

    rois: Tensor
    labels: Tensor
    box_targets: Tensor


@dataclass(frozen=True)
class RoiSampler:
    rois_per_image: int = 128
    fg_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou_lo: float = 0.1
    bg_iou_hi: float = 0.5
    crowd_ioa: float = 0.7
    bbox_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)

    def sample(self, *, proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_iscrowd: Tensor,
               generator: torch.Generator | None = None) -> RoiSample:
        """Sample one image's training ROIs.

        proposals: Tensor[P, 4]; gt_boxes: Tensor[G, 4]; gt_labels: Tensor[G] in
        1..K; gt_iscrowd: Tensor[G] bool; generator: a CPU generator (None: torch's
        global one). With no usable candidates R is 0.
        """
        # Zero-area ground truth cannot be regressed to (log 0); skip it like crowd boxes.
        wh = gt_boxes[:, 2:] - gt_boxes[:, :2]
        objects = ~gt_iscrowd & (wh > 0).all(dim=1)
        obj_boxes, obj_labels = gt_boxes[objects], gt_labels[objects]
        candidates = torch.cat([proposals, obj_boxes.to(proposals.dtype)])  # (P+G', 4)
        if obj_boxes.shape[0] > 0:
            max_iou, matched = box_iou(candidates, obj_boxes).max(dim=1)  # (P+G',), (P+G',)
        else:
            max_iou = candidates.new_zeros(candidates.shape[0])
            matched = torch.zeros(candidates.shape[0], dtype=torch.long, device=candidates.device)
        fg = max_iou >= self.fg_iou
        bg = (max_iou >= self.bg_iou_lo) & (max_iou < self.bg_iou_hi)
        crowd = gt_boxes[gt_iscrowd]
        if crowd.shape[0] > 0:
            bg &= box_ioa(candidates, crowd.to(candidates.dtype)).max(dim=1).values < self.crowd_ioa

        fg_idx = self._draw(torch.nonzero(fg).flatten(), round(self.fg_fraction * self.rois_per_image),
                            generator)
        bg_idx = self._draw(torch.nonzero(bg).flatten(), self.rois_per_image - fg_idx.numel(), generator)
        rois = torch.cat([candidates[fg_idx], candidates[bg_idx]])  # (R, 4)
        labels = torch.cat([obj_labels[matched[fg_idx]].long(),
                            torch.zeros(bg_idx.numel(), dtype=torch.long, device=rois.device)])  # (R,)
        targets = rois.new_zeros(rois.shape)  # (R, 4)
        if fg_idx.numel():
            targets[:fg_idx.numel()] = encode_boxes(boxes=obj_boxes[matched[fg_idx]].to(rois.dtype),
                                                    rois=rois[:fg_idx.numel()], weights=self.bbox_weights)
        return RoiSample(rois=rois, labels=labels, box_targets=targets)

    @staticmethod
    def _draw(indices: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
        """At most `count` of `indices`, drawn uniformly without replacement."""
        if indices.numel() <= count:
            return indices
        order = torch.randperm(indices.numel(), generator=generator)[:count]
        return indices[order.to(indices.device)]
