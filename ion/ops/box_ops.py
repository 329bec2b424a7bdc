"""Box operations on float `[x1, y1, x2, y2]` tensors.

Boxes are in continuous pixel coordinates (0 at the left edge of the first
pixel, width = x2 - x1), as in torchvision and COCO. Conversions from other
conventions live here, in functions named for them.
"""
import math

import torch
import torchvision
from torch import Tensor

# torchvision's guard against exp() overflow when decoding: no box grows more
# than 1000/16 times its proposal in one step.
DELTA_SCALE_CLAMP = math.log(1000.0 / 16)


def box_xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """COCO `[x, y, w, h]` -> `[x1, y1, x2, y2]`. Tensor[N, 4] -> Tensor[N, 4]."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def box_xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """`[x1, y1, x2, y2]` -> COCO `[x, y, w, h]`. Tensor[N, 4] -> Tensor[N, 4]."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1, y1, x2 - x1, y2 - y1], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Tensor[N, 4] -> Tensor[N]; degenerate boxes have area 0."""
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection over union. Tensor[N, 4], Tensor[M, 4] -> Tensor[N, M]."""
    return torchvision.ops.box_iou(boxes1, boxes2)


def box_ioa(boxes: Tensor, regions: Tensor) -> Tensor:
    """Intersection over the area of each box in `boxes` (not of the region):
    the fraction of box n that lies inside region m. Zero-area boxes give 0.

    Tensor[N, 4], Tensor[M, 4] -> Tensor[N, M]
    """
    lt = torch.max(boxes[:, None, :2], regions[None, :, :2])  # (N, M, 2)
    rb = torch.min(boxes[:, None, 2:], regions[None, :, 2:])  # (N, M, 2)
    inter = (rb - lt).clamp(min=0).prod(dim=-1)  # (N, M)
    area = box_area(boxes)[:, None]  # (N, 1)
    return torch.where(area > 0, inter / area.clamp(min=torch.finfo(inter.dtype).tiny), 0.0)


def encode_boxes(*, boxes: Tensor, rois: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Regression targets that move `rois` onto `boxes` (R-CNN box coding).

    dx = wx * (cx_box - cx_roi) / w_roi, dw = ww * log(w_box / w_roi), same for y, h.
    The weights (10, 10, 5, 5) normalise the targets to about unit variance,
    as Fast R-CNN's target means/stds do.

    boxes, rois: Tensor[R, 4] -> Tensor[R, 4] (dx, dy, dw, dh)
    """
    wx, wy, ww, wh = weights
    rw = rois[:, 2] - rois[:, 0]
    rh = rois[:, 3] - rois[:, 1]
    rcx = rois[:, 0] + 0.5 * rw
    rcy = rois[:, 1] + 0.5 * rh
    bw = boxes[:, 2] - boxes[:, 0]
    bh = boxes[:, 3] - boxes[:, 1]
    bcx = boxes[:, 0] + 0.5 * bw
    bcy = boxes[:, 1] + 0.5 * bh
    return torch.stack([
        wx * (bcx - rcx) / rw,
        wy * (bcy - rcy) / rh,
        ww * torch.log(bw / rw),
        wh * torch.log(bh / rh),
    ], dim=1)


def decode_boxes(*, deltas: Tensor, rois: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Inverse of `encode_boxes`: apply deltas to rois.

    deltas: Tensor[..., 4], rois: Tensor[..., 4] (broadcast, e.g. deltas
    Tensor[R, K, 4] against rois Tensor[R, 1, 4]) -> boxes Tensor[..., 4]
    """
    wx, wy, ww, wh = weights
    rw = rois[..., 2] - rois[..., 0]
    rh = rois[..., 3] - rois[..., 1]
    rcx = rois[..., 0] + 0.5 * rw
    rcy = rois[..., 1] + 0.5 * rh
    dx, dy, dw, dh = deltas.unbind(-1)
    cx = rcx + dx / wx * rw
    cy = rcy + dy / wy * rh
    w = rw * torch.exp((dw / ww).clamp(max=DELTA_SCALE_CLAMP))
    h = rh * torch.exp((dh / wh).clamp(max=DELTA_SCALE_CLAMP))
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def clip_boxes_xyxy(boxes: Tensor, *, height: float, width: float) -> Tensor:
    """Clip Tensor[..., 4] to the image `[0, width] x [0, height]`."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([
        x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height),
    ], dim=-1)


def flip_boxes_xyxy(boxes: Tensor, *, width: float) -> Tensor:
    """Mirror Tensor[..., 4] left-right in an image `width` wide: x -> width - x."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([width - x2, y1, width - x1, y2], dim=-1)


def flip_deltas(deltas: Tensor) -> Tensor:
    """Box deltas predicted on a mirrored image, mirrored back: dx changes sign,
    dy, dw, dh do not (exact for the centre-size coding above). Tensor[..., 4]."""
    return deltas * deltas.new_tensor([-1.0, 1.0, 1.0, 1.0])


def remove_small(boxes: Tensor, *, min_size: float) -> Tensor:
    """Indices of the boxes whose width and height are both >= min_size.
    Tensor[N, 4] -> Tensor[N'] int64"""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return torch.nonzero((w >= min_size) & (h >= min_size)).flatten()
