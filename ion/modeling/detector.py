"""The Inside-Outside Net (Sec. 3, Fig. 2): VGG16 -> context -> skip pooling -> fc6/fc7 -> outputs.

    image --VGG16--> conv1..conv5 (+conv7) --context--> context maps
    ROIs --skip pool (chosen layers, L2 norm, concat, scale, 1x1)--> Tensor[R, 512, 7, 7]
         --fc6, fc7--> class softmax Tensor[R, K+1], box deltas Tensor[R, K, 4]

The backbone and the context run once per image; every ROI set after that
only costs the skip pooling and the heads (`feature_maps` / `score_rois`), which
is what two-round box regression and flipping at test time reuse.
"""
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ion.modeling.backbone import VGG16Backbone
from ion.modeling.heads import DetectionHeads
from ion.modeling.losses import detection_losses
from ion.modeling.sampling import RoiSampler
from ion.modeling.seg_head import CROWD_LABEL, SegmentationHead, seg_loss, seg_targets
from ion.modeling.skip_pool import SkipPool


class FeatureMaps(NamedTuple):
    """pooled: the maps skip pooling reads (`SkipPool.prepare` of the
    `pool_from` layers in order, each Tensor[1, C_i, H_i, W_i], or the one
    fused map); context: the context module's outputs (the
    last is the top map the segmentation head reads; empty without context)."""

    pooled: list[Tensor]
    context: list[Tensor]


class IONDetector(nn.Module):
    """forward(image Tensor[1, 3, H, W], proposals Tensor[P, 4], targets=None)

    Proposals and target boxes are in the resized image's coordinates.
    train mode: targets = {"boxes": Tensor[G, 4], "labels": Tensor[G] (1..K),
      "iscrowd": Tensor[G] bool, "masks": Tensor[G, h, w] (only with the
      segmentation head)} -> dict of weighted loss terms "cls", "bbox" (and
      "seg"); the total loss is their sum.
    eval mode: -> (scores Tensor[P, K+1] softmax, deltas Tensor[P, K, 4]).
    """

    def __init__(self, *, backbone: VGG16Backbone, context: nn.Module, pool_from: tuple[str, ...],
                 skip_pool: SkipPool, heads: DetectionHeads, sampler: RoiSampler,
                 seg_head: SegmentationHead | None = None, seg_loss_weight: float = 0.0,
                 pixel_mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                 pixel_std: tuple[float, ...] = (0.229, 0.224, 0.225)):
        super().__init__()
        assert (seg_head is None) == (seg_loss_weight == 0.0)
        self.backbone = backbone
        self.context = context
        self.pool_from = tuple(pool_from)
        self.skip_pool = skip_pool
        self.heads = heads
        self.sampler = sampler
        self.seg_head = seg_head
        self.seg_loss_weight = seg_loss_weight
        self.bbox_weights = sampler.bbox_weights
        # Normalisation the backbone expects (ion.data.transforms.normalize_image);
        # not saved in checkpoints: it comes from the config.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std), persistent=False)

    @property
    def num_classes(self) -> int:
        """K, the foreground classes."""
        return self.heads.num_classes

    def feature_maps(self, image: Tensor) -> FeatureMaps:
        """Run the backbone and the context once for Tensor[1, 3, H, W]."""
        return self.maps_from_backbone(self.backbone(image))

    def maps_from_backbone(self, feats: dict[str, Tensor]) -> FeatureMaps:
        """The context and the maps skip pooling reads, from the backbone's outputs
        {name: Tensor[1, C, H, W]} (for callers that also need those outputs)."""
        # Sec. 3.2: the context module sits on conv5 (docs/CONTRACTS.md).
        context = self.context(feats["conv5"])
        pooled: list[Tensor] = []
        for name in self.pool_from:
            pooled.extend(context if name == "context" else [feats[name]])
        return FeatureMaps(pooled=self.skip_pool.prepare(pooled), context=context)

    def score_rois(self, maps: FeatureMaps, rois: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits Tensor[R, K+1] and box deltas Tensor[R, K, 4] for Tensor[R, 4]."""
        first = maps.pooled[0]
        # The ROIs stay at least float32 whatever the maps' dtype: in bfloat16 (8
        # significant bits) a coordinate near 1000 px moves by up to 2 px (998.6 ->
        # 1000), so the pooled region would no longer be the box the targets and
        # the decoded detections refer to. Pooling reads half-precision maps in
        # float32 (ion/modeling/skip_pool.py).
        dtype = torch.promote_types(first.dtype, torch.float32)
        x = self.skip_pool(maps.pooled, rois.to(device=first.device, dtype=dtype))  # (R, C, 7, 7)
        return self.heads(x)

    def forward(self, image: Tensor, proposals: Tensor, targets: dict[str, Tensor] | None = None, *,
                generator: torch.Generator | None = None):
        if not self.training:
            return self._predict(image, proposals)
        if targets is None:
            raise ValueError("IONDetector in train mode needs targets (call model.eval() to predict)")
        maps = self.feature_maps(image)
        on_device = dict(device=image.device, dtype=image.dtype)
        sample = self.sampler.sample(proposals=proposals.to(**on_device), gt_boxes=targets["boxes"].to(**on_device),
                                     gt_labels=targets["labels"].to(image.device),
                                     gt_iscrowd=targets["iscrowd"].to(image.device).bool(), generator=generator)
        logits, deltas = self.score_rois(maps, sample.rois)
        losses = detection_losses(class_logits=logits, box_deltas=deltas, labels=sample.labels,
                                  box_targets=sample.box_targets)
        if self.seg_head is not None:
            losses["seg"] = self.seg_loss_weight * self._seg_loss(image, maps, targets)
        return losses

    def _predict(self, image: Tensor, proposals: Tensor) -> tuple[Tensor, Tensor]:
        K = self.num_classes
        if proposals.shape[0] == 0:
            return image.new_zeros((0, K + 1)), image.new_zeros((0, K, 4))
        logits, deltas = self.score_rois(self.feature_maps(image), proposals)
        return logits.softmax(dim=1), deltas  # (P, K+1), (P, K, 4)

    def _seg_loss(self, image: Tensor, maps: FeatureMaps, targets: dict[str, Tensor]) -> Tensor:
        """Sec. 3.2 / 5.3: per-pixel softmax loss on the top context map, training only."""
        if "masks" not in targets:
            raise ValueError("the segmentation head (seg_loss_weight > 0) needs instance masks in targets['masks']")
        H, W = image.shape[-2:]
        labels = torch.where(targets["iscrowd"].bool(), torch.full_like(targets["labels"], CROWD_LABEL),
                             targets["labels"])
        target = seg_targets(targets["masks"], labels, (H, W))  # (H, W)
        logits = self.seg_head(maps.context[-1], (H, W))  # (1, K+1, H, W)
        return seg_loss(logits, target.to(logits.device))

    def parameter_groups(self) -> list[dict]:
        """Parameters split for weight decay, for `torch.optim.SGD(groups, ...)`.

        Every parameter is listed, frozen ones too, so the optimizer built once
        serves every training phase. Each group carries "weight_decay_mult"
        (Caffe's decay_mult): the trainer sets group["weight_decay"] =
        weight_decay * group["weight_decay_mult"]. Biases, the skip-pooling
        scales and normalisation parameters (all 1-d) get no decay.
        """
        decay, no_decay = [], []
        for p in self.parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)
        return [{"params": decay, "weight_decay_mult": 1.0, "name": "weights"},
                {"params": no_decay, "weight_decay_mult": 0.0, "name": "biases_and_scales"}]
