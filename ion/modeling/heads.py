"""fc6, fc7 and the two outputs of Fast R-CNN (Sec. 3): a one-of-(K+1) class
softmax and class-specific box regression.

fc6/fc7 have VGG16's classifier shapes (25088 -> 4096 -> 4096 at width 1), so
torchvision's `classifier.0` and `classifier.3` load into them.
"""
from pathlib import Path

import torch
from torch import Tensor, nn

from ion.modeling.backbone import copy_checked, read_vgg16_state_dict


class DetectionHeads(nn.Module):
    """forward(x Tensor[R, C, S, S]) -> (class logits Tensor[R, K+1], box deltas Tensor[R, K, 4]).

    Deltas are per foreground class (no background deltas), coded by
    `ion.ops.box_ops.encode_boxes`.
    """

    def __init__(self, *, in_channels: int, pool_size: int, fc_dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.fc6 = nn.Linear(in_channels * pool_size * pool_size, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.dropout = nn.Dropout(dropout)
        self.cls_score = nn.Linear(fc_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(fc_dim, 4 * num_classes)
        # fc6/fc7 from scratch: torchvision's VGG classifier init, N(0, 0.01)
        # (ImageNet weights overwrite it). With inputs at the amplitude the L2
        # scale of Sec. 3.1 restores, it starts the class logits near 1, where
        # He init would start them near 5. Outputs as in Fast R-CNN.
        for fc in (self.fc6, self.fc7):
            nn.init.normal_(fc.weight, std=0.01)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        R = x.shape[0]
        x = x.flatten(1)  # (R, C*S*S), fc6's input order is pool5's (C, S, S)
        x = self.dropout(torch.relu(self.fc6(x)))  # (R, fc_dim)
        x = self.dropout(torch.relu(self.fc7(x)))  # (R, fc_dim)
        logits = self.cls_score(x)  # (R, K+1)
        deltas = self.bbox_pred(x).view(R, self.num_classes, 4)  # (R, K, 4)
        return logits, deltas


def load_vgg16_fc67(heads: DetectionHeads, path: Path) -> None:
    """Copy VGG16's fc6 (`classifier.0`) and fc7 (`classifier.3`) from a
    torchvision state_dict file; the outputs stay freshly initialised."""
    keys = {"fc6.weight": "classifier.0.weight", "fc6.bias": "classifier.0.bias",
            "fc7.weight": "classifier.3.weight", "fc7.bias": "classifier.3.bias"}
    copy_checked(target=heads, prefix="heads.", state=read_vgg16_state_dict(path), keys=keys, path=Path(path))
