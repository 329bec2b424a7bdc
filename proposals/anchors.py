"""Anchor boxes of the modified RPN (Appendix item 2).

Shapes: `Tensor[A, 4]` xyxy boxes centred at (0, 0); placed on a feature map of
stride `s` they become `Tensor[H * W * A, 4]` in (resized) image coordinates,
ordered location-major (row, column) then anchor, the order in which
proposals/rpn/ flattens the head's outputs.

Aspect ratio convention (as in py-faster-rcnn's generate_anchors.py): ratio
r = h / w, and an anchor of scale s keeps the area s * s, so
w = s / sqrt(r), h = s * sqrt(r). Ratio 0.5 ("1:2") is a wide box, 2 ("2:1") a
tall one. Unlike py-faster-rcnn the sizes are not rounded to whole pixels:
the paper's 90.5 = 64 * sqrt(2) is kept as is.
"""
import math
from typing import Sequence

import torch
from torch import Tensor

# Appendix item 2: "32x32 and aspect ratios {1:2, 1:1, 2:1} x scales
# {64, 90.5, 128, 181, 256, 362, 512}" -- 1 + 3 * 7 = 22 anchors per location.
PAPER_BASE_SIZE = 32.0
PAPER_RATIOS = (0.5, 1.0, 2.0)
PAPER_SCALES = (64.0, 90.5, 128.0, 181.0, 256.0, 362.0, 512.0)


def anchor_shapes(
    *, base_size: float, ratios: Sequence[float], scales: Sequence[float], scale: float = 1.0
) -> Tensor:
    """Anchor boxes centred at 0: one `base_size` square, then for each scale
    (outer) and ratio (inner) a box of area scale^2 with h / w = ratio.
    Every size is multiplied by `scale` (a dataset with small images shrinks the
    whole set). Returns float32 Tensor[A, 4], A = 1 + len(scales) * len(ratios)
    (no square when base_size is 0)."""
    sizes = [(base_size, base_size)] if base_size > 0 else []
    for s in scales:
        for r in ratios:
            sizes.append((s / math.sqrt(r), s * math.sqrt(r)))  # (w, h)
    wh = torch.tensor(sizes, dtype=torch.float64) * scale  # (A, 2)
    half = wh / 2
    return torch.cat([-half, half], dim=1).to(torch.float32)  # (A, 4)


def paper_anchor_shapes(scale: float = 1.0) -> Tensor:
    """The paper's 22 anchors (Appendix item 2), sizes times `scale`:
    float32 Tensor[22, 4] centred at 0."""
    return anchor_shapes(
        base_size=PAPER_BASE_SIZE, ratios=PAPER_RATIOS, scales=PAPER_SCALES, scale=scale
    )


def grid_anchors(shapes: Tensor, *, height: int, width: int, stride: int) -> Tensor:
    """Anchors on every cell of a `height` x `width` feature map of `stride`.

    Each anchor is centred on its cell's centre, ((x + 0.5) * stride,
    (y + 0.5) * stride) in continuous pixel coordinates, the centre of the
    image patch the cell summarises. `shapes` Tensor[A, 4] centred at 0.
    Returns Tensor[H * W * A, 4] xyxy, index (y * W + x) * A + a."""
    A = shapes.shape[0]
    ys = (torch.arange(height, dtype=torch.float32, device=shapes.device) + 0.5) * stride
    xs = (torch.arange(width, dtype=torch.float32, device=shapes.device) + 0.5) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(height * width, 1, 4)  # (H*W, 1, 4)
    return (centres + shapes.reshape(1, A, 4)).reshape(height * width * A, 4)  # (H*W*A, 4)
