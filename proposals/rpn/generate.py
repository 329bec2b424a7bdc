"""Proposals from a trained RPN: top anchors by objectness, decoded, clipped, NMS."""
from typing import Optional

import numpy as np
import torch
import torchvision
from torch import Tensor

from ion.engine.loop import AUTOCAST_DTYPES
from ion.ops.box_ops import clip_boxes_xyxy, decode_boxes, remove_small
from proposals.rpn.config import RpnConfig
from proposals.rpn.model import (
    RPN_BOX_WEIGHTS,
    VARIANTS,
    RegionProposalNetwork,
    Variant,
    flatten_head_outputs,
    image_anchors,
    prepare_image,
)


@torch.no_grad()
def generate_proposals_all(model: RegionProposalNetwork, image: np.ndarray, cfg: RpnConfig,
                           variants: tuple[Variant, ...] = VARIANTS, amp: Optional[str] = None
                           ) -> dict[Variant, tuple[np.ndarray, np.ndarray]]:
    """Proposals of several variants from one backbone pass over `image`
    uint8 (H, W, 3): {variant: (boxes float32 (P, 4) xyxy in original-image
    pixels, scores float32 (P,) objectness probabilities, best first)}.

    amp: the autocast dtype of the network's pass ("off", "bf16", "fp16");
    None: cfg.amp on a GPU, off on the CPU. The head outputs are cast to
    float32 before anchors are ranked, decoded and suppressed."""
    was_training = model.training
    model.eval()
    device = model.anchors.device
    if amp is None:
        amp = cfg.amp if device.type == "cuda" else "off"
    dtype = AUTOCAST_DTYPES[amp]
    H, W = image.shape[:2]
    x = prepare_image(image, min_size=cfg.min_size, max_size=cfg.max_size, flip=False, device=device)
    Hr, Wr = x.shape[-2:]
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        outputs = model(x, variants)
    anchors = image_anchors(model, outputs[variants[0]][0])
    to_original = x.new_tensor([W / Wr, H / Hr, W / Wr, H / Hr])
    result = {}
    for variant, (objectness, deltas) in outputs.items():
        logits, d = flatten_head_outputs(objectness.float(), deltas.float())
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
