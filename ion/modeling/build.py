"""build_detector: the one place that reads ModelConfig."""
from pathlib import Path

from ion.modeling.backbone import VGG16Backbone, load_vgg16_imagenet, scaled_channels
from ion.modeling.config import POOLABLE, ModelConfig
from ion.modeling.context import build_context
from ion.modeling.detector import IONDetector
from ion.modeling.heads import DetectionHeads, load_vgg16_fc67
from ion.modeling.sampling import RoiSampler
from ion.modeling.seg_head import SegmentationHead
from ion.modeling.skip_pool import SkipPool

# VGG16's fc6/fc7 width, scaled with the backbone when fc_dim is not given.
VGG16_FC_DIM = 4096


def build_detector(cfg: ModelConfig, num_classes: int) -> IONDetector:
    """The ION detector `cfg` describes for K = num_classes foreground classes,
    with ImageNet weights loaded when `cfg.imagenet_weights` is set."""
    assert num_classes >= 1
    backbone = VGG16Backbone(width=cfg.width, conv67=cfg.conv67, batchnorm=cfg.batchnorm,
                             block_convs=tuple(cfg.block_convs))
    c5 = backbone.channels["conv5"]
    context = build_context(cfg.context, in_channels=c5)

    # Concatenation order is fixed (shallow to deep, then context), whatever
    # order the config lists the layers in.
    pool_from = tuple(name for name in POOLABLE if name in cfg.pool_from)
    in_channels: list[int] = []
    strides: list[int] = []
    for name in pool_from:
        if name == "context":
            in_channels += list(context.out_channels)
            strides += [backbone.strides["conv5"]] * len(context.out_channels)
        else:
            in_channels.append(backbone.channels[name])
            strides.append(backbone.strides[name])
    if cfg.reduce:
        reduce_channels = c5 if cfg.reduce_channels is None else cfg.reduce_channels
    else:
        reduce_channels = sum(in_channels)  # no 1x1 conv: fc6 reads the pooled maps (Fast R-CNN's pool5)
    skip_pool = SkipPool(in_channels=tuple(in_channels), strides=tuple(strides), out_channels=reduce_channels,
                         pool_size=cfg.pool_size, roi_op=cfg.roi_op, norm=cfg.norm, scale_mode=cfg.scale_mode,
                         scale_init=cfg.scale_init, dropout=cfg.dropout, fuse=cfg.fuse, reduce=cfg.reduce)
    fc_dim = scaled_channels(VGG16_FC_DIM, cfg.width) if cfg.fc_dim is None else cfg.fc_dim
    heads = DetectionHeads(in_channels=reduce_channels, pool_size=cfg.pool_size, fc_dim=fc_dim,
                           num_classes=num_classes, dropout=cfg.dropout)
    s = cfg.sampling
    sampler = RoiSampler(rois_per_image=s.rois_per_image, fg_fraction=s.fg_fraction, fg_iou=s.fg_iou,
                         bg_iou_lo=s.bg_iou_lo, bg_iou_hi=s.bg_iou_hi, crowd_ioa=s.crowd_ioa,
                         bbox_weights=tuple(cfg.bbox_weights))
    seg_head = None
    if cfg.seg_loss_weight > 0:
        seg_head = SegmentationHead(in_channels=context.out_channels[-1], num_classes_with_bg=num_classes + 1,
                                    stride=backbone.strides["conv5"])
    if cfg.imagenet_weights is not None:
        load_vgg16_imagenet(backbone, Path(cfg.imagenet_weights))
        load_vgg16_fc67(heads, Path(cfg.imagenet_weights))
    return IONDetector(backbone=backbone, context=context, pool_from=pool_from, skip_pool=skip_pool, heads=heads,
                       sampler=sampler, seg_head=seg_head, seg_loss_weight=cfg.seg_loss_weight,
                       pixel_mean=tuple(cfg.input.pixel_mean), pixel_std=tuple(cfg.input.pixel_std))
