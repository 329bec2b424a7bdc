"""ModelConfig: the `model` config section, read only by `ion.modeling.build.build_detector`.

Defaults are the paper's ION (Sec. 3, 4.1): VGG16, skip pooling from conv3,
conv4, conv5 and the 2x stacked IRNN context, L2 normalisation per ROI blob
with a learned scale initialised to 1000, no dropout (Table 1 "D"). The small
CPU model changes `width`, `batchnorm` and the input sizes.
"""
from dataclasses import dataclass, field
from typing import Literal, Optional

from ion.modeling.backbone import BLOCK_CHANNELS, scaled_channels

# Layers skip pooling can read (Sec. 3.1, Table 4; conv7: Appendix item 3).
POOLABLE = ("conv2", "conv3", "conv4", "conv5", "conv7", "context")


@dataclass(frozen=True)
class ContextConfig:
    kind: Literal["none", "conv3", "conv5", "global", "irnn"] = field(
        default="irnn",
        metadata={"help": "context module on conv5 (Table 7): none, 2x 3x3 conv, 2x 5x5 conv, "
                          "global average tiled back, or 2x stacked 4-direction IRNN"})
    hidden: int = field(
        default=512, metadata={"help": "IRNN hidden units per direction (Table 9 explores 128..1024)", "min": 1})
    recurrent: Literal["learned", "identity"] = field(
        default="learned",
        metadata={"help": "IRNN recurrent matrix: learned from the identity, or removed (Whh = I, Table 9)"})
    first_step_bias: bool = field(
        default=False, metadata={"help": "a separate bias for each IRNN direction's first step (Sec. 3.2 item 3)"})
    layers: int = field(
        default=2,
        metadata={"help": "stacked IRNN layers (Table 8: 1, 2 or 3; the paper's choice is 2)", "min": 1, "max": 3})
    input_to_hidden: Literal["shared", "per_direction"] = field(
        default="shared",
        metadata={"help": "IRNN input-to-hidden 1x1 conv: one shared by the four directions (Sec. 3.2), or "
                          "one per direction (unshared; sharing cost 0.1 mAP in the paper)"})
    variant: Literal["standard", "lr_then_ud"] = field(
        default="standard",
        metadata={"help": "IRNN directions: all four in both layers, or left-right then up-down (Table 10a)"})
    pool_from_both: bool = field(
        default=False,
        metadata={"help": "pool from both stacked layers, not only the top one (Table 10b); "
                          "kinds conv3, conv5, irnn (ignored by none and global)"})
    dropout: float = field(
        default=0.0,
        metadata={"help": "dropout after each stacked layer (Sec. 3.2 item 2 used 0.25; 0 disables)",
                  "min": 0.0, "max": 1.0})
    channels: Optional[int] = field(
        default=None,
        metadata={"help": "output channels of the conv3/conv5 kinds (default: the paper's 512 / 256)",
                  "min": 1})
    state_norm: Literal["none", "steps"] = field(
        default="none",
        metadata={"help": "IRNN read-out: the hidden states as they are (the paper), or divided by the "
                          "number of cells each direction has scanned (running means)"})
    input_init: Literal["random", "identity"] = field(
        default="random",
        metadata={"help": "the first IRNN layer's input-to-hidden 1x1 conv: random (the paper), or the "
                          "identity (needs hidden = conv5's channels), so each direction starts as a "
                          "plain accumulator of conv5"})
    pool_directions: Literal["concat", "separate"] = field(
        default="concat",
        metadata={"help": "with pool_from_both, the first IRNN layer's directions are pooled as one map "
                          "(concat), or one map per direction, each L2-normalised on its own"})

    def __post_init__(self):
        # Settings of other kinds are ignored, not errors: `-o model.context.kind=global`
        # on an IRNN config means just that.
        if self.kind == "irnn" and self.pool_directions == "separate" and not self.pool_from_both:
            raise ValueError("pool_directions separate pools the first IRNN layer, which needs "
                             "pool_from_both: true")
        if self.kind == "irnn" and self.variant == "lr_then_ud" and self.layers != 2:
            raise ValueError(f"variant lr_then_ud is one left-right and one up-down layer, so it needs "
                             f"layers: 2 (got {self.layers}); set layers 2 or variant standard")


@dataclass(frozen=True)
class InputConfig:
    min_size: int = field(default=600, metadata={
        "help": "images are resized so that the shorter side is this many pixels (Fast R-CNN: 600)", "min": 1})
    max_size: int = field(default=1000, metadata={
        "help": "cap on the longer side after resizing, in pixels (Fast R-CNN: 1000)", "min": 1})
    pixel_mean: tuple[float, ...] = field(default=(0.485, 0.456, 0.406), metadata={
        "help": "RGB mean subtracted from pixels scaled to [0, 1] (torchvision's ImageNet VGG16)"})
    pixel_std: tuple[float, ...] = field(default=(0.229, 0.224, 0.225), metadata={
        "help": "RGB std that pixels are divided by after the mean (torchvision's ImageNet VGG16)"})

    def __post_init__(self) -> None:
        if self.max_size < self.min_size:
            raise ValueError(f"max_size ({self.max_size}) must be >= min_size ({self.min_size})")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3:
            raise ValueError(f"pixel_mean and pixel_std need 3 values (R, G, B), got "
                             f"{list(self.pixel_mean)} and {list(self.pixel_std)}")
        if min(self.pixel_std) <= 0:
            raise ValueError(f"pixel_std values must be > 0, got {list(self.pixel_std)}")


@dataclass(frozen=True)
class RoiSamplingConfig:
    rois_per_image: int = field(default=128, metadata={
        "help": "ROIs sampled per training image (Sec. 4.1: 128)", "min": 1})
    fg_fraction: float = field(default=0.25, metadata={
        "help": "largest fraction of sampled ROIs that are foreground (Fast R-CNN: 0.25)", "min": 0.0, "max": 1.0})
    fg_iou: float = field(default=0.5, metadata={
        "help": "a ROI with IoU >= this with a ground-truth box is foreground", "min": 0.0, "max": 1.0})
    bg_iou_lo: float = field(default=0.1, metadata={
        "help": "background ROIs have max IoU in [bg_iou_lo, bg_iou_hi) (Fast R-CNN: 0.1)", "min": 0.0, "max": 1.0})
    bg_iou_hi: float = field(default=0.5, metadata={
        "help": "upper end (exclusive) of the background IoU range (Fast R-CNN: 0.5)", "min": 0.0, "max": 1.0})
    crowd_ioa: float = field(default=0.7, metadata={
        "help": "a proposal with at least this fraction of its area inside a crowd box is never "
                "background (Detectron's crowd rule)", "min": 0.0, "max": 1.0})

    def __post_init__(self) -> None:
        if not self.bg_iou_lo < self.bg_iou_hi <= self.fg_iou:
            raise ValueError(f"need bg_iou_lo < bg_iou_hi <= fg_iou, got {self.bg_iou_lo}, {self.bg_iou_hi}, "
                             f"{self.fg_iou}")


@dataclass(frozen=True)
class ModelConfig:
    # Backbone (Sec. 3; Appendix item 3).
    width: float = field(default=1.0, metadata={
        "help": "VGG16 channel multiplier: 1.0 is VGG16, 0.25 the small CPU model (16..128 channels)",
        "min": 0.03, "max": 1.0})
    block_convs: tuple[int, ...] = field(default=(2, 2, 3, 3, 3), metadata={
        "help": "3x3 convs in each of the five blocks conv1..conv5 (VGG16: 2 2 3 3 3; the small CPU model: "
                "1 1 1 1 1)", "min": 1})
    batchnorm: bool = field(default=False, metadata={
        "help": "BatchNorm after every backbone conv (not VGG16: for small models trained from scratch)"})
    conv67: bool = field(default=False, metadata={
        "help": "two 3x3 convs on conv5_3 (conv6, conv7; Appendix item 3), poolable as conv7"})
    imagenet_weights: Optional[str] = field(default=None, metadata={
        "help": "torchvision VGG16 state_dict file (conv1-conv5, fc6, fc7); none: random init "
                "(needs width 1.0, batchnorm false)", "path": True})

    # Skip pooling (Sec. 3.1, Tables 4 and 5).
    pool_from: tuple[str, ...] = field(default=("conv3", "conv4", "conv5", "context"), metadata={
        "help": "layers ROIs are pooled from: conv2, conv3, conv4, conv5, conv7, context (Table 4)"})
    roi_op: Literal["roi_pool", "roi_align"] = field(default="roi_pool", metadata={
        "help": "ROI pooling op: max pooling (the paper) or bilinear roi_align (2x2 samples per bin)"})
    fuse: bool = field(default=False, metadata={
        "help": "skip pooling in the other order: normalise, resample, concat, scale and 1x1-reduce the maps "
                "once per image, then pool every ROI once (linear ops, so nearly the same function; needs "
                "norm channel or none)"})
    pool_size: int = field(default=7, metadata={
        "help": "side of each pooled ROI (VGG16's fc6 needs 7)", "min": 1, "max": 32})
    norm: Literal["none", "blob", "channel"] = field(default="blob", metadata={
        "help": "L2 normalisation per pooled ROI: none (Table 4 left), whole blob, or per location across "
                "channels (Table 5)"})
    scale_mode: Literal["learned", "fixed"] = field(default="learned", metadata={
        "help": "re-scale after L2 normalisation: learned per channel or a fixed constant (Table 5)"})
    scale_init: Optional[float] = field(default=None, metadata={
        "help": "initial (or fixed) scale; none: 1000 for norm blob, 130 for channel (Sec. 5.2)",
        "min": 1e-6})
    reduce: bool = field(default=True, metadata={
        "help": "the 1x1 conv after the concat (Sec. 3.1); false: the pooled map goes straight into fc6, "
                "Fast R-CNN's pool5 with pool_from [conv5] and norm none (the FRCN rows of Tables 3 and 11)"})
    reduce_channels: Optional[int] = field(default=None, metadata={
        "help": "output channels of the 1x1 conv after concat; none: conv5's channels (512 for VGG16)",
        "min": 1})
    fc_dim: Optional[int] = field(default=None, metadata={
        "help": "width of fc6 and fc7; none: 4096 x width (4096 for VGG16)", "min": 1})
    dropout: float = field(default=0.0, metadata={
        "help": "dropout after the concat and in fc6/fc7 (the paper used 0.25 and then removed it, Table 1 D)",
        "min": 0.0, "max": 0.95})

    # Context (Sec. 3.2) and the segmentation regulariser (Sec. 5.3).
    context: ContextConfig = field(default_factory=ContextConfig, metadata={
        "help": "context module on conv5 (built by ion/modeling/context.py)"})
    seg_loss_weight: float = field(default=0.0, metadata={
        "help": "weight of the segmentation loss on the top context map (paper: 1); 0 turns the head off",
        "min": 0.0})

    # Input and training-time ROI sampling.
    input: InputConfig = field(default_factory=InputConfig, metadata={
        "help": "image resizing and normalisation"})
    sampling: RoiSamplingConfig = field(default_factory=RoiSamplingConfig, metadata={
        "help": "training ROI sampling per image (Sec. 4.1)"})
    bbox_weights: tuple[float, ...] = field(default=(10.0, 10.0, 5.0, 5.0), metadata={
        "help": "box delta normalisation wx, wy, ww, wh (the usual 10, 10, 5, 5)"})

    def __post_init__(self) -> None:
        unknown = [name for name in self.pool_from if name not in POOLABLE]
        if unknown or not self.pool_from:
            raise ValueError(f"pool_from: {list(self.pool_from)}: choose one or more of {list(POOLABLE)}")
        if len(set(self.pool_from)) != len(self.pool_from):
            raise ValueError(f"pool_from: {list(self.pool_from)} names a layer twice")
        if "conv7" in self.pool_from and not self.conv67:
            raise ValueError("pool_from has conv7 but conv67 is false (set conv67: true or drop conv7)")
        has_context = self.context.kind != "none"
        if "context" in self.pool_from and not has_context:
            raise ValueError("pool_from has context but context.kind is none (choose a context kind or "
                             "drop context from pool_from)")
        if self.seg_loss_weight > 0 and not has_context:
            raise ValueError("seg_loss_weight > 0 needs a context module (the head reads its top map); "
                             "choose a context kind or set seg_loss_weight 0")
        if has_context and "context" not in self.pool_from and self.seg_loss_weight == 0:
            raise ValueError(f"context.kind is {self.context.kind} but nothing reads it: add context to "
                             "pool_from, set seg_loss_weight > 0, or set context.kind none")
        if self.context.kind == "irnn" and self.context.input_init == "identity":
            conv5 = scaled_channels(BLOCK_CHANNELS[-1], self.width)
            if self.context.hidden != conv5:
                raise ValueError(f"context.hidden: {self.context.hidden}: context.input_init identity needs "
                                 f"hidden = conv5's channels ({conv5} at width {self.width}); set "
                                 f"context.hidden to {conv5} or context.input_init to random")
        if len(self.block_convs) != 5 or min(self.block_convs) < 1:
            raise ValueError(f"block_convs: expected 5 counts >= 1 (conv1..conv5), got {list(self.block_convs)}")
        if self.fuse and self.norm == "blob":
            raise ValueError("fuse: true normalises each location of each map; set norm channel or none "
                             "(norm blob needs the pooled ROI)")
        if not self.reduce:
            if self.fuse:
                raise ValueError("reduce: false needs fuse: false (the fused order is built around the 1x1 conv)")
            if self.reduce_channels is not None:
                raise ValueError("reduce: false has no 1x1 conv, so reduce_channels means nothing: drop it "
                                 "(fc6 reads the pooled channels)")
            if self.imagenet_weights is not None and tuple(self.pool_from) != ("conv5",):
                raise ValueError(f"reduce: false with imagenet_weights feeds the pooled maps to VGG16's fc6, "
                                 f"which reads conv5 alone: set pool_from [conv5] (got {list(self.pool_from)})")
        if len(self.bbox_weights) != 4 or min(self.bbox_weights) <= 0:
            raise ValueError(f"bbox_weights: expected 4 values > 0, got {list(self.bbox_weights)}")
        if self.imagenet_weights is not None:
            if self.width != 1.0 or self.batchnorm or tuple(self.block_convs) != (2, 2, 3, 3, 3):
                raise ValueError(f"imagenet_weights needs width 1.0, batchnorm false and block_convs "
                                 f"[2, 2, 3, 3, 3] (got width {self.width}, batchnorm {self.batchnorm}, "
                                 f"block_convs {list(self.block_convs)})")
            if self.pool_size != 7 or self.reduce_channels not in (None, 512) or self.fc_dim not in (None, 4096):
                raise ValueError("imagenet_weights also loads fc6/fc7, which need pool_size 7, "
                                 "reduce_channels 512 and fc_dim 4096 (drop those keys)")
