"""Fast R-CNN's multi-task loss: softmax cross entropy over K+1 classes and
smooth L1 on the ground-truth class's box deltas of foreground ROIs.

The segmentation loss lives with its head (ion/modeling/seg_head.py, `seg_loss`).
"""
import torch.nn.functional as F
from torch import Tensor


def detection_losses(*, class_logits: Tensor, box_deltas: Tensor, labels: Tensor,
                     box_targets: Tensor) -> dict[str, Tensor]:
    """{"cls", "bbox"} for one image's sampled ROIs.

    class_logits: Tensor[R, K+1]; box_deltas: Tensor[R, K, 4]; labels: Tensor[R]
    int64 (0 = background); box_targets: Tensor[R, 4].

    bbox sums smooth L1 (beta 1) over the 4 coordinates of each foreground ROI's
    own class and divides by R, as Fast R-CNN does (background ROIs count in the
    denominator). With R = 0 both losses are 0 and still carry a graph.
    """
    R = class_logits.shape[0]
    if R == 0:
        zero = class_logits.sum() * 0.0 + box_deltas.sum() * 0.0
        return {"cls": zero, "bbox": zero}
    cls = F.cross_entropy(class_logits, labels)
    fg = labels > 0
    fg_deltas = box_deltas[fg, labels[fg] - 1]  # (F, 4): deltas of each ROI's gt class
    bbox = F.smooth_l1_loss(fg_deltas, box_targets[fg], beta=1.0, reduction="sum") / R
    return {"cls": cls, "bbox": bbox}
