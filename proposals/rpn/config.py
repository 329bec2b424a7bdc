"""RpnConfig: the modified RPN of the Appendix (item 2): anchors, head, training
schedule and proposal generation. Read only by proposals/rpn/'s factory
`build_rpn` and by its training and generation functions.

Defaults are the paper's COCO recipe on full-size images (VGG16, shorter side
600); a small synthetic dataset shrinks the anchors with `anchor_scale` and the
network with `backbone_width` / `head_width`.
"""
from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass(frozen=True)
class RpnConfig:
    # Anchors (Appendix item 2): 22 per location.
    anchor_base_size: float = field(
        default=32.0,
        metadata={"help": "side of the extra square anchor (Appendix: 32x32); 0 drops it", "min": 0.0},
    )
    anchor_ratios: tuple[float, ...] = field(
        default=(0.5, 1.0, 2.0),
        metadata={"help": "anchor aspect ratios h/w (Appendix: 1:2, 1:1, 2:1)"},
    )
    anchor_scales: tuple[float, ...] = field(
        default=(64.0, 90.5, 128.0, 181.0, 256.0, 362.0, 512.0),
        metadata={"help": "anchor scales: sqrt of the anchor area in pixels (Appendix item 2)"},
    )
    anchor_scale: float = field(
        default=1.0,
        metadata={"help": "multiplier on every anchor size (shrink for small images)", "min": 1e-3},
    )

    # Head: a mixture of 3x3 (384) and 5x5 (128) convolutions (Appendix item 2).
    head_conv3_channels: int = field(
        default=384, metadata={"help": "channels of the head's 3x3 convolution (Appendix: 384)", "min": 1}
    )
    head_conv5_channels: int = field(
        default=128, metadata={"help": "channels of the head's 5x5 convolution (Appendix: 128)", "min": 1}
    )
    head_width: float = field(
        default=1.0,
        metadata={"help": "multiplier on both head convolutions' channels (< 1 for CPU)", "min": 1e-3},
    )
    l2_scale: float = field(
        default=20.0,
        metadata={
            "help": "RPN2: initial learnable per-channel scale after per-location L2 normalisation",
            "min": 1e-6,
        },
    )

    # Backbone.
    backbone_width: float = field(
        default=1.0, metadata={"help": "VGG16 channel multiplier (0.25 -> 16..128 channels)", "min": 1e-3}
    )
    batchnorm: bool = field(
        default=False, metadata={"help": "batch normalisation in the backbone (small nets from scratch)"}
    )
    imagenet_weights: Optional[str] = field(
        default=None,
        metadata={"help": "VGG16 ImageNet weights (torchvision key names); none: random init", "path": True},
    )
    # Faster R-CNN freezes conv1 and conv2 of ImageNet VGG16; frozen random
    # layers would be useless, so the default trains everything and the COCO
    # config (with imagenet_weights) sets [conv1, conv2].
    frozen: tuple[str, ...] = field(
        default=(),
        metadata={"help": "backbone groups not trained (with ImageNet weights: conv1, conv2)"},
    )

    # Training: Faster R-CNN's RPN recipe (Ren et al. Sec. 3.1.3 and 3.3).
    iterations: int = field(default=80000, metadata={"help": "RPN training iterations", "min": 1})
    lr: float = field(default=0.001, metadata={"help": "SGD learning rate", "min": 0.0})
    lr_step: float = field(
        default=0.75,
        metadata={"help": "fraction of iterations after which lr drops 10x (Faster R-CNN: 60k of 80k)",
                  "min": 0.0, "max": 1.0},
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum", "min": 0.0, "max": 1.0})
    weight_decay: float = field(default=0.0005, metadata={"help": "SGD weight decay", "min": 0.0})
    images_per_batch: int = field(default=1, metadata={"help": "images per SGD step", "min": 1})
    min_size: int = field(
        default=600, metadata={"help": "images are resized so the shorter side is this (pixels)", "min": 1}
    )
    max_size: int = field(
        default=1000, metadata={"help": "cap on the longer side after resizing (pixels)", "min": 1}
    )
    flip: bool = field(default=True, metadata={"help": "random horizontal flip during training"})
    anchors_per_image: int = field(
        default=256, metadata={"help": "anchors sampled per image for the loss", "min": 1}
    )
    positive_fraction: float = field(
        default=0.5,
        metadata={"help": "at most this fraction of sampled anchors is positive", "min": 0.0, "max": 1.0},
    )
    pos_iou: float = field(
        default=0.7,
        metadata={"help": "anchors with IoU >= this with a ground-truth box are positive",
                  "min": 0.0, "max": 1.0},
    )
    neg_iou: float = field(
        default=0.3,
        metadata={"help": "anchors with IoU < this with every ground-truth box are negative",
                  "min": 0.0, "max": 1.0},
    )
    crowd_ioa: float = field(
        default=0.7,
        metadata={"help": "negative anchors with this fraction of their area inside a crowd box are ignored",
                  "min": 0.0, "max": 1.0},
    )

    # Training runs on ion/engine/ (resumable; Ray Train with several workers or GPUs).
    checkpoint_every: int = field(
        default=1000,
        metadata={"help": "RPN training checkpoint (weights, momentum, RNG, data cursor) every N iterations; "
                          "a rerun resumes from it", "min": 1},
    )
    log_every: int = field(
        default=20, metadata={"help": "log RPN losses, lr and images/s every N iterations", "min": 1}
    )
    max_failures: int = field(
        default=2, metadata={"help": "Ray Train: restarts of a failed RPN worker group", "min": 0}
    )

    # Generation.
    amp: Literal["off", "bf16", "fp16"] = field(
        default="off",
        metadata={"help": "autocast dtype of the RPN's forward pass in proposal generation on a GPU "
                          "(outputs decoded in float32); ignored on the CPU"},
    )
    pre_nms_top_n: int = field(
        default=6000, metadata={"help": "highest-scoring anchors decoded before NMS", "min": 1}
    )
    nms_iou: float = field(
        default=0.7, metadata={"help": "NMS IoU threshold for proposals", "min": 0.0, "max": 1.0}
    )
    post_nms_top_n: int = field(
        default=2000, metadata={"help": "proposals kept per image after NMS (N)", "min": 1}
    )
    min_box_size: float = field(
        default=2.0,
        metadata={"help": "proposals narrower or shorter than this (original pixels) are dropped",
                  "min": 0.0},
    )

    def __post_init__(self) -> None:
        if not self.anchor_scales and self.anchor_base_size == 0:
            raise ValueError("no anchors: anchor_scales is empty and anchor_base_size is 0")
        if self.anchor_scales and not self.anchor_ratios:
            raise ValueError("anchor_ratios is empty: give at least one ratio, e.g. [1.0]")
        if any(r <= 0 for r in self.anchor_ratios) or any(s <= 0 for s in self.anchor_scales):
            raise ValueError(
                f"anchor_ratios {self.anchor_ratios} and anchor_scales {self.anchor_scales} must all be > 0"
            )
        if self.neg_iou > self.pos_iou:
            raise ValueError(f"neg_iou ({self.neg_iou}) must be <= pos_iou ({self.pos_iou})")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must be <= max_size ({self.max_size})")
        if self.post_nms_top_n > self.pre_nms_top_n:
            raise ValueError(
                f"post_nms_top_n ({self.post_nms_top_n}) must be <= pre_nms_top_n ({self.pre_nms_top_n})"
            )
        unknown = set(self.frozen) - {"conv1", "conv2", "conv3", "conv4", "conv5"}
        if unknown:
            raise ValueError(f"frozen: unknown backbone groups {sorted(unknown)} (use conv1..conv5)")
