"""The modified Region Proposal Network of the Appendix (item 2): RPN1 and RPN2.

- Anchors: 22 per location (proposals/anchors.py) on conv5_3's grid (stride 16).
- Head: a 3x3 (384) and a 5x5 (128) convolution side by side, concatenated,
  ReLU, then 1x1 convolutions for objectness (A) and box deltas (4A).
- RPN1 predicts from conv5_3. RPN2 predicts from conv4_3 and conv5_3
  concatenated after L2 normalisation and scaling. conv4_3 (stride 8) is
  brought to conv5's stride by a 2x2 max pool of stride 2: the same operation
  as VGG16's own pool4 between conv4_3 and conv5_1, so both maps summarise the
  same cells and odd sizes round the way conv5 does. The normalisation is per
  location across channels (ParseNet; Sec. 5.2 finds it as good as the
  whole-blob one) with a learnable per-channel scale per layer (Sec. 3.1's
  "scale layer"), initialised to `RpnConfig.l2_scale`.

One `RegionProposalNetwork` holds one backbone and both heads, trained jointly
(the sum of both heads' losses): the paper trains two RPNs; sharing the
backbone halves the training cost and each head still sees only its own
input features. A proposal source is the network plus the head of its variant.

Boxes are float32 xyxy in continuous pixel coordinates (docs/CONTRACTS.md);
`generate_proposals` returns them in original-image coordinates.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from ion.backbone import VGG16Backbone, load_vgg16_imagenet, scaled_channels
from ion.box_ops import (box_ioa, box_iou, clip_boxes_xyxy, decode_boxes, encode_boxes,
                         flip_boxes_xyxy, remove_small)
from ion.errors import UserError
from proposals.anchors import anchor_shapes, grid_anchors
from proposals.rpn_config import RpnConfig

Variant = Literal["rpn1", "rpn2"]
VARIANTS: tuple[Variant, ...] = ("rpn1", "rpn2")

# Anchor labels (named sentinels, as torchvision's Matcher).
POSITIVE = 1
NEGATIVE = 0
IGNORE = -1

# Faster R-CNN's RPN regresses deltas without target normalisation.
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
# torchvision's RPN smooth-L1 transition point.
SMOOTH_L1_BETA = 1.0 / 9.0
# torchvision's VGG16 ImageNet weights expect RGB in [0, 1] normalised thus.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The config fields trained weights are tied to (parameter shapes, and the
# anchors the deltas are relative to): a checkpoint loads only when these match.
ARCHITECTURE_FIELDS = ("anchor_base_size", "anchor_ratios", "anchor_scales", "anchor_scale",
                       "head_conv3_channels", "head_conv5_channels", "head_width", "backbone_width",
                       "batchnorm")

# One training sample: image uint8 (H, W, 3) RGB, ground-truth boxes float32
# (G, 4) xyxy in image pixels, iscrowd bool (G,).
TrainSample = tuple[np.ndarray, np.ndarray, np.ndarray]
Progress = Callable[[Iterable, str], Iterable]


class RPNHead(nn.Module):
    """3x3 and 5x5 convolutions in parallel, concatenated, ReLU, then per-anchor
    objectness logits and box deltas (Appendix item 2).

    forward(x Tensor[N, C, H, W]) -> (objectness Tensor[N, A, H, W],
                                      deltas Tensor[N, 4 * A, H, W])
    """

    def __init__(self, *, in_channels: int, conv3_channels: int, conv5_channels: int, num_anchors: int):
        super().__init__()
        self.conv3 = nn.Conv2d(in_channels, conv3_channels, kernel_size=3, padding=1)
        self.conv5 = nn.Conv2d(in_channels, conv5_channels, kernel_size=5, padding=2)
        hidden = conv3_channels + conv5_channels
        self.objectness = nn.Conv2d(hidden, num_anchors, kernel_size=1)
        self.deltas = nn.Conv2d(hidden, 4 * num_anchors, kernel_size=1)
        # Faster R-CNN initialises the RPN layers from N(0, 0.01), zero bias.
        for conv in (self.conv3, self.conv5, self.objectness, self.deltas):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(torch.cat([self.conv3(x), self.conv5(x)], dim=1))  # (N, C3 + C5, H, W)
        return self.objectness(h), self.deltas(h)


class L2NormScale(nn.Module):
    """L2 normalisation across channels at each location, then a learnable
    per-channel scale (Sec. 3.1's scale layer). Tensor[N, C, H, W] -> same."""

    def __init__(self, *, channels: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, p=2.0, dim=1) * self.scale.view(1, -1, 1, 1)


class RegionProposalNetwork(nn.Module):
    """A VGG16 backbone with the RPN1 head (on conv5_3) and the RPN2 head (on
    L2-normalised, scaled conv4_3 + conv5_3).

    forward(images Tensor[N, 3, H, W]) -> {variant: (objectness Tensor[N, A, H5, W5],
                                                     deltas Tensor[N, 4A, H5, W5])}
    `anchors` Tensor[A, 4] centred at 0, placed on conv5's grid of stride `stride`.
    """

    def __init__(self, *, backbone: VGG16Backbone, anchors: Tensor, conv3_channels: int,
                 conv5_channels: int, l2_scale: float):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("anchors", anchors.clone(), persistent=False)
        self.stride = backbone.strides["conv5"]
        c4, c5 = backbone.channels["conv4"], backbone.channels["conv5"]
        self.norm4 = L2NormScale(channels=c4, init=l2_scale)
        self.norm5 = L2NormScale(channels=c5, init=l2_scale)
        A = anchors.shape[0]
        self.heads = nn.ModuleDict({
            "rpn1": RPNHead(in_channels=c5, conv3_channels=conv3_channels,
                            conv5_channels=conv5_channels, num_anchors=A),
            "rpn2": RPNHead(in_channels=c4 + c5, conv3_channels=conv3_channels,
                            conv5_channels=conv5_channels, num_anchors=A),
        })

    @property
    def num_anchors(self) -> int:
        return self.anchors.shape[0]

    def head_inputs(self, feats: dict[str, Tensor]) -> dict[Variant, Tensor]:
        """The input map of each head: conv5_3 for RPN1; for RPN2, pooled
        conv4_3 and conv5_3, each L2-normalised and scaled, concatenated."""
        c4, c5 = feats["conv4"], feats["conv5"]
        H5, W5 = c5.shape[-2:]
        pooled4 = F.max_pool2d(c4, kernel_size=2, stride=2)  # (N, C4, H5, W5), as VGG16's pool4
        assert pooled4.shape[-2:] == (H5, W5), (pooled4.shape, c5.shape)
        both = torch.cat([self.norm4(pooled4), self.norm5(c5)], dim=1)  # (N, C4 + C5, H5, W5)
        return {"rpn1": c5, "rpn2": both}

    def forward(self, images: Tensor, variants: tuple[Variant, ...] = VARIANTS
                ) -> dict[Variant, tuple[Tensor, Tensor]]:
        inputs = self.head_inputs(self.backbone(images))
        return {v: self.heads[v](inputs[v]) for v in variants}


def build_rpn(cfg: RpnConfig, *, load_imagenet: bool = True) -> RegionProposalNetwork:
    """The RPN described by `cfg` (the only reader of its architecture fields).
    ImageNet weights are copied into the backbone when `cfg.imagenet_weights`
    is set and `load_imagenet` (a checkpoint about to be loaded skips them)."""
    backbone = VGG16Backbone(width=cfg.backbone_width, conv67=False, batchnorm=cfg.batchnorm)
    if load_imagenet and cfg.imagenet_weights is not None:
        load_vgg16_imagenet(backbone, Path(cfg.imagenet_weights))
    anchors = anchor_shapes(base_size=cfg.anchor_base_size, ratios=cfg.anchor_ratios,
                            scales=cfg.anchor_scales, scale=cfg.anchor_scale)
    return RegionProposalNetwork(
        backbone=backbone, anchors=anchors,
        conv3_channels=scaled_channels(cfg.head_conv3_channels, cfg.head_width),
        conv5_channels=scaled_channels(cfg.head_conv5_channels, cfg.head_width),
        l2_scale=cfg.l2_scale)


def flatten_head_outputs(objectness: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image rows in the order of `grid_anchors`: (y, x, anchor).
    objectness Tensor[N, A, H, W], deltas Tensor[N, 4A, H, W]
    -> Tensor[N, H*W*A], Tensor[N, H*W*A, 4]"""
    N, A, H, W = objectness.shape
    logits = objectness.permute(0, 2, 3, 1).reshape(N, H * W * A)  # (N, H*W*A)
    d = deltas.view(N, A, 4, H, W).permute(0, 3, 4, 1, 2).reshape(N, H * W * A, 4)  # (N, H*W*A, 4)
    return logits, d


# ---------------------------------------------------------------- training targets


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
                   generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random anchors for the loss: at most num * positive_fraction positives,
    negatives filling the rest of `num` (Ren et al. Sec. 3.1.3: 256, half).
    labels int64 Tensor[M] -> (positive indices Tensor[p], negative indices Tensor[n])."""
    positive = torch.nonzero(labels == POSITIVE).flatten().cpu()
    negative = torch.nonzero(labels == NEGATIVE).flatten().cpu()
    num_pos = min(positive.numel(), int(num * positive_fraction))
    num_neg = min(negative.numel(), num - num_pos)
    pos = positive[torch.randperm(positive.numel(), generator=generator)[:num_pos]]
    neg = negative[torch.randperm(negative.numel(), generator=generator)[:num_neg]]
    return pos.to(labels.device), neg.to(labels.device)


def rpn_losses(*, logits: Tensor, deltas: Tensor, anchors: Tensor, gt_boxes: Tensor,
               gt_iscrowd: Tensor, cfg: RpnConfig, generator: torch.Generator) -> dict[str, Tensor]:
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


# ---------------------------------------------------------------- images


def rpn_input_size(*, height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to min_size, with the
    longer side capped at max_size (Fast R-CNN's rescale)."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def prepare_image(image: np.ndarray, *, min_size: int, max_size: int, flip: bool,
                  device: torch.device) -> Tensor:
    """uint8 (H, W, 3) RGB -> normalised Tensor[1, 3, H', W'] at the RPN's
    input size, mirrored left-right when `flip`."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    H, W = image.shape[:2]
    # np.array copies: images read from caches may be read-only, which torch warns about.
    x = torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1)[None].float() / 255.0
    if flip:
        x = x.flip(-1)
    size = rpn_input_size(height=H, width=W, min_size=min_size, max_size=max_size)
    if size != (H, W):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std  # (1, 3, H', W')


def image_anchors(model: RegionProposalNetwork, feature: Tensor) -> Tensor:
    """Anchors on the grid of `feature` Tensor[N, C, H5, W5]: Tensor[H5*W5*A, 4]."""
    H5, W5 = feature.shape[-2:]
    return grid_anchors(model.anchors, height=H5, width=W5, stride=model.stride)


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainStep:
    """One logged training iteration."""
    iteration: int
    lr: float
    loss: float
    losses: dict[str, float]  # "<variant>/objectness", "<variant>/deltas"


def learning_rate(cfg: RpnConfig, iteration: int) -> float:
    """cfg.lr, divided by 10 from iteration lr_step * iterations on (Faster R-CNN's step)."""
    return cfg.lr if iteration < cfg.lr_step * cfg.iterations else cfg.lr * 0.1


def make_optimizer(model: RegionProposalNetwork, cfg: RpnConfig) -> torch.optim.SGD:
    """SGD with weight decay on conv weights only: biases, batch-norm and L2
    scale parameters are not decayed (decaying the L2 scale would shrink RPN2's
    input amplitude, the thing the scale exists to set)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=cfg.lr, momentum=cfg.momentum)


def image_losses(model: RegionProposalNetwork, sample: TrainSample, cfg: RpnConfig, *,
                 flip: bool, generator: torch.Generator) -> dict[str, Tensor]:
    """Both heads' losses on one (optionally mirrored) image, keys "<variant>/<term>"."""
    image, boxes, iscrowd = sample
    device = model.anchors.device
    x = prepare_image(image, min_size=cfg.min_size, max_size=cfg.max_size, flip=flip, device=device)
    H, W = image.shape[:2]
    Hr, Wr = x.shape[-2:]
    gt = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), device=device)  # (G, 4)
    if flip:
        gt = flip_boxes_xyxy(gt, width=float(W))
    gt = gt * gt.new_tensor([Wr / W, Hr / H, Wr / W, Hr / H])
    crowd = torch.as_tensor(np.asarray(iscrowd, dtype=bool).reshape(-1), device=device)  # (G,)
    outputs = model(x)
    anchors = image_anchors(model, outputs["rpn1"][0])
    losses: dict[str, Tensor] = {}
    for variant, (objectness, deltas) in outputs.items():
        logits, d = flatten_head_outputs(objectness, deltas)
        terms = rpn_losses(logits=logits[0], deltas=d[0], anchors=anchors, gt_boxes=gt,
                           gt_iscrowd=crowd, cfg=cfg, generator=generator)
        losses.update({f"{variant}/{k}": v for k, v in terms.items()})
    return losses


def train_rpn(model: RegionProposalNetwork, images_iter: Iterable[TrainSample], cfg: RpnConfig,
              progress: Optional[Progress] = None, *, seed: int = 0) -> list[TrainStep]:
    """Train both heads (and the unfrozen backbone groups) jointly with SGD for
    cfg.iterations steps of cfg.images_per_batch images, mirrored at random
    when cfg.flip. The sum of RPN1's and RPN2's losses is minimised.

    `images_iter` yields (image uint8 (H, W, 3), boxes float32 (G, 4) xyxy,
    iscrowd bool (G,)); when it runs out it is iterated again from the start
    (so pass a re-iterable sequence, or a generator long enough).
    `progress(iterable, desc)` wraps the iteration loop (e.g. ctx.progress).
    Flips and anchor sampling are drawn from a generator seeded with `seed`.
    Returns one TrainStep per iteration. Raises FloatingPointError at the first
    non-finite loss, naming the iteration and the loss terms.
    """
    model.backbone.set_frozen(tuple(cfg.frozen))
    model.train()
    optimizer = make_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(seed)
    samples = _cycle(images_iter)
    steps: Iterable[int] = range(cfg.iterations)
    if progress is not None:
        steps = progress(steps, "train rpn")
    history: list[TrainStep] = []
    for iteration in steps:
        lr = learning_rate(cfg, iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for _ in range(cfg.images_per_batch):
            flip = cfg.flip and bool(torch.rand((), generator=generator) < 0.5)
            losses = image_losses(model, next(samples), cfg, flip=flip, generator=generator)
            loss = sum(losses.values()) / cfg.images_per_batch
            if not torch.isfinite(loss):
                terms = {k: v.item() for k, v in losses.items()}
                raise FloatingPointError(f"RPN training: non-finite loss at iteration {iteration}: {terms}")
            loss.backward()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + v.item() / cfg.images_per_batch
        optimizer.step()
        history.append(TrainStep(iteration=iteration, lr=lr, loss=sum(totals.values()), losses=totals))
    model.eval()
    return history


def _cycle(samples: Iterable[TrainSample]):
    """Yield from `samples` forever, restarting it when it runs out."""
    while True:
        empty = True
        for sample in samples:
            empty = False
            yield sample
        if empty:
            raise ValueError("train_rpn: the training images ran out (or there were none); "
                             "pass a re-iterable sequence of (image, boxes, iscrowd)")


# ---------------------------------------------------------------- generation


@torch.no_grad()
def generate_proposals_all(model: RegionProposalNetwork, image: np.ndarray, cfg: RpnConfig,
                           variants: tuple[Variant, ...] = VARIANTS
                           ) -> dict[Variant, tuple[np.ndarray, np.ndarray]]:
    """Proposals of several variants from one backbone pass over `image`
    uint8 (H, W, 3): {variant: (boxes float32 (P, 4) xyxy in original-image
    pixels, scores float32 (P,) objectness probabilities, best first)}."""
    was_training = model.training
    model.eval()
    H, W = image.shape[:2]
    x = prepare_image(image, min_size=cfg.min_size, max_size=cfg.max_size, flip=False,
                      device=model.anchors.device)
    Hr, Wr = x.shape[-2:]
    outputs = model(x, variants)
    anchors = image_anchors(model, outputs[variants[0]][0])
    to_original = x.new_tensor([W / Wr, H / Hr, W / Wr, H / Hr])
    result = {}
    for variant, (objectness, deltas) in outputs.items():
        logits, d = flatten_head_outputs(objectness, deltas)
        boxes, scores = select_proposals(logits=logits[0], deltas=d[0], anchors=anchors,
                                         to_original=to_original, height=H, width=W, cfg=cfg)
        result[variant] = (boxes.cpu().numpy().astype(np.float32), scores.cpu().numpy().astype(np.float32))
    model.train(was_training)
    return result


def generate_proposals(model: RegionProposalNetwork, image: np.ndarray, variant: Variant,
                       cfg: RpnConfig) -> tuple[np.ndarray, np.ndarray]:
    """One variant's proposals for `image` uint8 (H, W, 3): boxes float32
    (P, 4) xyxy in original-image pixels, scores float32 (P,), best first,
    P <= cfg.post_nms_top_n."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown RPN variant {variant!r}; choose from {VARIANTS}")
    return generate_proposals_all(model, image, cfg, variants=(variant,))[variant]


def select_proposals(*, logits: Tensor, deltas: Tensor, anchors: Tensor, to_original: Tensor,
                     height: int, width: int, cfg: RpnConfig) -> tuple[Tensor, Tensor]:
    """Top pre_nms_top_n anchors by objectness, decoded, mapped to the original
    image and clipped to it, tiny boxes removed, NMS, top post_nms_top_n.

    logits Tensor[M], deltas Tensor[M, 4], anchors Tensor[M, 4] (resized
    image), to_original Tensor[4] per-coordinate factors
    -> boxes Tensor[P, 4], scores Tensor[P] (sigmoid), best first.
    """
    top = logits.topk(min(cfg.pre_nms_top_n, logits.numel())).indices
    boxes = decode_boxes(deltas=deltas[top], rois=anchors[top], weights=RPN_BOX_WEIGHTS)
    boxes = clip_boxes_xyxy(boxes * to_original, height=float(height), width=float(width))
    scores = torch.sigmoid(logits[top])
    keep = remove_small(boxes, min_size=cfg.min_box_size)
    boxes, scores = boxes[keep], scores[keep]
    keep = torchvision.ops.nms(boxes, scores, cfg.nms_iou)[: cfg.post_nms_top_n]
    return boxes[keep], scores[keep]


# ---------------------------------------------------------------- checkpoints


def architecture(cfg: RpnConfig) -> dict:
    """The config fields the weights are tied to, as plain values."""
    return {name: (list(v) if isinstance(v := getattr(cfg, name), tuple) else v)
            for name in ARCHITECTURE_FIELDS}


def save_rpn(model: RegionProposalNetwork, path: Path, cfg: RpnConfig) -> None:
    """Write the weights and the architecture fields of `cfg` to `path`
    atomically (a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"architecture": architecture(cfg), "state_dict": state}, tmp)
    os.replace(tmp, path)


def load_rpn(path: Path, cfg: RpnConfig) -> RegionProposalNetwork:
    """The RPN of `cfg` with the weights saved at `path` by `save_rpn`, on the
    CPU, in eval mode. UserError when the file is missing, unreadable, or was
    saved for a different architecture."""
    path = Path(path)
    fix = "rerun the proposals stage with --force to retrain the RPN"
    if not path.is_file():
        raise UserError(f"{path}: RPN weights not found ({fix})")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means a damaged or foreign file
        raise UserError(f"{path}: not an RPN checkpoint ({exc}); {fix}") from exc
    if not isinstance(saved, dict) or "state_dict" not in saved or "architecture" not in saved:
        raise UserError(f"{path}: not an RPN checkpoint written by save_rpn; {fix}")
    wanted = architecture(cfg)
    differ = {k: (saved["architecture"].get(k), v) for k, v in wanted.items()
              if saved["architecture"].get(k) != v}
    if differ:
        detail = ", ".join(f"proposals.rpn.{k}: saved {a!r}, config {b!r}" for k, (a, b) in differ.items())
        raise UserError(f"{path}: RPN weights were trained with another architecture ({detail}); {fix}")
    model = build_rpn(cfg, load_imagenet=False)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return model
