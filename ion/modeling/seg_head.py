"""Semantic segmentation regulariser on the top context map (Sec. 3.2, 5.3, Table 6).

Training only: the head adds supervision from per-pixel class labels (about
+1 mAP, Table 6) and is dropped at test time.  As in FCN (Long et al.), a 1x1
"score" convolution gives K+1 class scores at conv5's resolution, a
deconvolution with a 32x32 kernel and stride 16 initialised to bilinear
interpolation upsamples them x16, and a crop aligns them with the image.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Target value of pixels the loss skips (crowd regions).
SEG_IGNORE = -1
# Label that marks a crowd mask in ``seg_targets``: its pixels become SEG_IGNORE.
CROWD_LABEL = -1


def bilinear_kernel(size: int) -> Tensor:
    """FCN's bilinear upsampling filter, Tensor[size, size] (peak at the centre, (size-1)/2)."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    ramp = 1 - (torch.arange(size, dtype=torch.float32) - center).abs() / factor  # (size,)
    return ramp[:, None] * ramp[None, :]


class SegmentationHead(nn.Module):
    """Per-pixel class logits from a stride-``stride`` feature map.

    forward(features Tensor[N, C, h, w], image_hw (H, W)) -> logits Tensor[N, K+1, H, W].
    h, w are the feature map's size for an H x W image (floor or ceil of H/16).
    """

    def __init__(self, *, in_channels: int, num_classes_with_bg: int, stride: int = 16):
        super().__init__()
        if stride < 2 or stride % 2:
            raise ValueError(f"stride must be even (the crop offset is 1.5 * stride), got {stride}")
        self.stride = stride
        self.score = nn.Conv2d(in_channels, num_classes_with_bg, kernel_size=1)
        # FCN: the class scoring layer starts at zero.
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)
        # Sec. 3.2: deconvolution x16 with a 32x32 kernel (2 * stride), one filter
        # per class, initialised to bilinear interpolation as in FCN.
        self.upsample = nn.ConvTranspose2d(
            num_classes_with_bg, num_classes_with_bg, kernel_size=2 * stride, stride=stride,
            groups=num_classes_with_bg, bias=False)
        with torch.no_grad():
            self.upsample.weight.copy_(bilinear_kernel(2 * stride).expand_as(self.upsample.weight))

    def forward(self, features: Tensor, image_hw: tuple[int, int]) -> Tensor:
        H, W = image_hw
        h, w = features.shape[2:]
        s = self.stride
        # Feature cell i covers pixels [s*i, s*i + s), centre s*i + (s-1)/2.  The
        # pixels past the last cell's centre need one more cell beyond it.
        if H > s * (h + 1) + s // 2 or W > s * (w + 1) + s // 2:
            raise ValueError(f"image size {(H, W)} is larger than the stride-{s} feature map {(h, w)} covers")
        scores = self.score(features)  # (N, K+1, h, w)
        # Replicate one cell before and two after (the image may extend up to
        # s-1 pixels past the features with torchvision's floor-mode pooling),
        # so that at the border the upsampled scores hold the edge value, as
        # bilinear interpolation does, instead of fading towards zero where a
        # plain deconvolution has a single input cell.
        padded = F.pad(scores, (1, 2, 1, 2), mode="replicate")  # (N, K+1, h+3, w+3)
        up = self.upsample(padded)  # (N, K+1, (h+4)*s, (w+4)*s)
        # Crop (FCN): the deconvolution centres padded cell i+1, i.e. feature
        # cell i, at pixel s*(i+1) + s - 1/2; the image wants it at s*i + (s-1)/2.
        # The difference, 1.5*s, is the crop offset.
        offset = s + s // 2
        return up[:, :, offset:offset + H, offset:offset + W]


def seg_targets(masks: Tensor, labels: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """Per-pixel class targets from instance masks, Tensor[H, W] long.

    masks: Tensor[G, h, w] bool or uint8, one mask per instance (any size:
        the label map is resized to ``image_hw`` by nearest neighbour).
    labels: Tensor[G], contiguous class labels 1..K, or CROWD_LABEL for crowd
        regions, whose pixels become SEG_IGNORE.
    Pixels no mask covers are background (0).  Where masks overlap the
    smallest (fewest pixels) wins: it is usually the object in front, and it
    would otherwise vanish inside the larger one.  Equal areas: the later mask
    in input order wins.  Crowd masks take part in the same ordering, so a
    small object inside a large crowd region keeps its label.
    """
    if masks.dim() != 3 or labels.shape != (masks.shape[0],):
        raise ValueError(f"expected masks (G, h, w) and labels (G,), got {tuple(masks.shape)} and "
                         f"{tuple(labels.shape)}")
    label_list = labels.tolist()
    if any(label != CROWD_LABEL and label < 1 for label in label_list):
        raise ValueError(f"labels must be 1..K or {CROWD_LABEL} (crowd), got {label_list}")
    masks = masks.bool()
    target = torch.zeros(masks.shape[1:], dtype=torch.long, device=masks.device)  # (h, w)
    areas = masks.flatten(1).sum(dim=1)  # (G,)
    # Paint the largest first so that smaller masks overwrite it.
    for g in torch.argsort(areas, descending=True, stable=True).tolist():
        target.masked_fill_(masks[g], SEG_IGNORE if label_list[g] == CROWD_LABEL else label_list[g])
    if tuple(target.shape) != tuple(image_hw):
        target = F.interpolate(target[None, None].float(), size=tuple(image_hw), mode="nearest-exact")
        target = target[0, 0].long()  # (H, W)
    return target


def seg_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Per-pixel softmax cross entropy, mean over the pixels that are not SEG_IGNORE.

    logits: Tensor[N, K+1, H, W]; target: Tensor[N, H, W] (or Tensor[H, W] when N = 1) long.
    An image whose pixels are all ignored gives a zero loss that still has a graph.
    """
    if target.dim() == 2:
        target = target[None]
    if not bool((target != SEG_IGNORE).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=SEG_IGNORE)
