"""Skip pooling (Sec. 3.1, Tables 4 and 5): one fixed-size descriptor per ROI
from several layers.

Each map is ROI-pooled to SxS at its own stride, L2-normalised per ROI (over
the whole pooled blob, or per location across channels), the pooled blobs are
concatenated along channels, re-scaled (learned per channel or fixed), and a
1x1 convolution reduces them to the shape fc6 expects (512x7x7 for VGG16).
`reduce=False` drops the 1x1 conv: with conv5 alone and norm "none" this is
Fast R-CNN's pool5, ROI-pooled conv5 straight into fc6 (the "FRCN" rows of
Tables 3, 4 and 11).

`fuse: true` computes the same thing in the other order, once per image:
each map is L2-normalised per location ("channel" or "none" only: a blob norm
needs the ROI), resampled bilinearly to the finest map's grid, concatenated,
re-scaled and reduced by the 1x1 conv into one map, and every ROI is pooled
once from it. ROI pooling by roi_align and the 1x1 conv are both linear, so
the two orders differ only by where the bilinear resampling happens; the
fused order pools one map instead of one per layer, and its 1x1 conv runs
over the image (H*W locations) instead of over R*S*S pooled cells, which is
fewer whenever R * S * S > H * W (64 ROIs at 7x7 against a 32x32 map). The
1x1 conv also commutes with the resampling, so it runs on each map before it
(`SkipPool.reduce_then_resample`) and only its output channels are resampled.
"""
import math
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from ion.ops.roi_align import roi_align_sparse

RoiOp = Literal["roi_pool", "roi_align"]
Norm = Literal["none", "blob", "channel"]
ScaleMode = Literal["learned", "fixed"]

# Sec. 5.2: the mean L2 norm of conv5 ROIs pooled by Fast R-CNN, measured on
# the training set: about 1000 over all entries, about 130 across channels.
SCALE_INIT = {"blob": 1000.0, "channel": 130.0}

# Bilinear samples per bin side for roi_align. A fixed count, as in Mask R-CNN:
# torchvision's adaptive count (ceil(roi size / S)) takes ~100 samples per bin
# for a large ROI on the stride-4 conv3 map and makes the backward pass crawl.
ROI_ALIGN_SAMPLING = 2


def roi_pool_map(feat: Tensor, boxes: Tensor, *, op: RoiOp, output_size: int, stride: int) -> Tensor:
    """Pool ROIs from one map of stride `stride`.

    feat: Tensor[1, C, H, W]; boxes: Tensor[R, 4] image coordinates
    -> Tensor[R, C, output_size, output_size]
    """
    scale = 1.0 / stride
    if feat.dtype in (torch.float16, torch.bfloat16):
        # Half-precision maps are pooled in float32 on every device, with float32
        # ROIs (a bfloat16 coordinate near 1000 px is off by up to 2 px): torchvision's
        # CPU kernels have no half-precision versions, and its CUDA autocast wrappers
        # pool in float32 too, so CPU and GPU round alike.
        feat = feat.float()
    if boxes.dtype in (torch.float16, torch.bfloat16):
        boxes = boxes.float()
    if op == "roi_pool":
        return torchvision.ops.roi_pool(feat, [boxes], output_size=output_size, spatial_scale=scale)
    assert op == "roi_align", op
    if feat.device.type == "cpu":
        # The same op as a sparse product (ion/ops/roi_align.py): on the CPU its backward
        # is 3-5x and its forward 2-4.6x faster than torchvision's kernels (bench/roi_align.py).
        # CPU autocast would turn the sparse product to bfloat16, which has no CPU kernel.
        with torch.autocast("cpu", enabled=False):
            return roi_align_sparse(feat, boxes, output_size=output_size, spatial_scale=scale,
                                    sampling_ratio=ROI_ALIGN_SAMPLING)
    # aligned=True: in continuous coordinates cell i of a stride-s map is
    # centred at image coordinate (i + 0.5) * s.
    return torchvision.ops.roi_align(feat, [boxes], output_size=output_size, spatial_scale=scale,
                                     sampling_ratio=ROI_ALIGN_SAMPLING, aligned=True)


def l2_normalize_rois(x: Tensor, *, norm: Norm) -> Tensor:
    """L2-normalise pooled ROIs, Table 5: "blob" sums over all C*S*S entries of
    each ROI, "channel" sums across channels at each location (ParseNet).
    Tensor[R, C, S, S] -> same shape."""
    if norm == "blob":
        R, C, S, _ = x.shape
        return F.normalize(x.reshape(R, C * S * S), dim=1).view_as(x)
    if norm == "channel":
        return F.normalize(x, dim=1)
    assert norm == "none", norm
    return x


class SkipPool(nn.Module):
    """Sec. 3.1: pool, L2-normalise, concat, re-scale, dropout, 1x1 conv.

    prepare(maps list of Tensor[1, C_i, H_i, W_i]) -> list of maps, once per
    image (the fused map, Tensor[1, out_channels, H_f, W_f], with fuse; the
    maps unchanged without);
    forward(prepared maps, rois Tensor[R, 4] in image coordinates)
    -> Tensor[R, out_channels, S, S]
    """

    def __init__(self, *, in_channels: tuple[int, ...], strides: tuple[int, ...], out_channels: int,
                 pool_size: int = 7, roi_op: RoiOp = "roi_pool", norm: Norm = "blob",
                 scale_mode: ScaleMode = "learned", scale_init: float | None = None,
                 dropout: float = 0.0, fuse: bool = False, reduce: bool = True):
        super().__init__()
        assert len(in_channels) == len(strides) > 0
        if fuse and not reduce:
            raise ValueError("fused skip pooling is built around the 1x1 conv (it runs before the "
                             "resampling); reduce=False needs fuse=False")
        if fuse and norm == "blob":
            raise ValueError("fused skip pooling normalises each location (norm channel or none); "
                             "norm blob needs the pooled ROI")
        self.fuse = fuse
        self.strides = tuple(strides)
        self.pool_size = pool_size
        self.roi_op = roi_op
        self.norm = norm
        self.scale_mode = scale_mode
        total = sum(in_channels)
        init = SCALE_INIT.get(norm, 1.0) if scale_init is None else scale_init
        if norm == "none":
            self.scale = None  # Table 4, left column: concat + 1x1 conv only
        elif scale_mode == "learned":
            self.scale = nn.Parameter(torch.full((total,), float(init)))  # one per concat channel
        else:
            self.register_buffer("scale", torch.tensor(float(init)))
        self.dropout = nn.Dropout(dropout)  # Sec. 3.2 item 2: dropout after each concat
        if not reduce:
            if out_channels != total:
                raise ValueError(f"without the 1x1 conv fc6 reads the concat itself: out_channels "
                                 f"({out_channels}) must be the pooled channels ({total})")
            self.reduce = None  # Fast R-CNN: pool5 straight into fc6
            self.out_channels = total
            return
        self.out_channels = out_channels
        self.reduce = nn.Conv2d(total, out_channels, kernel_size=1)
        # Sec. 3.1: "Xavier" as in Caffe, uniform with variance 1/fan_in, so the
        # 1x1 conv keeps the amplitude of its input however many maps are concatenated.
        bound = math.sqrt(3.0 / total)
        nn.init.uniform_(self.reduce.weight, -bound, bound)
        nn.init.zeros_(self.reduce.bias)

    def pool(self, maps: list[Tensor], rois: Tensor) -> list[Tensor]:
        """Normalised pooled ROIs per map: list of Tensor[R, C_i, S, S]."""
        assert len(maps) == len(self.strides)
        return [
            l2_normalize_rois(
                roi_pool_map(m, rois, op=self.roi_op, output_size=self.pool_size, stride=s),
                norm=self.norm)
            for m, s in zip(maps, self.strides)
        ]

    def prepare(self, maps: list[Tensor]) -> list[Tensor]:
        """What `forward` pools from: the maps themselves, or with fuse the one
        fused map [Tensor[1, out_channels, H_f, W_f]] at the finest stride."""
        if not self.fuse:
            return maps
        assert len(maps) == len(self.strides)
        finest = min(range(len(maps)), key=lambda i: self.strides[i])
        size = maps[finest].shape[-2:]
        normed = [l2_normalize_rois(m, norm=self.norm) for m in maps]
        factors = [s // self.strides[finest] for s in self.strides]
        if self.training and self.dropout.p > 0:
            # Dropout masks each upsampled concat entry: only the literal order has them.
            return [self.concat_then_reduce(normed, factors, size)]
        return [self.reduce_then_resample(normed, factors, size)]

    def concat_then_reduce(self, maps: list[Tensor], factors: list[int], size: torch.Size) -> Tensor:
        """The fused map in the order of the spec: resample each L2-normalised map
        Tensor[1, C_i, H_i, W_i] by its factor to `size`, concat, re-scale, dropout,
        1x1 conv -> Tensor[1, out_channels, H_f, W_f]."""
        grid = [resample_to(m, factor=f, size=size) for m, f in zip(maps, factors)]
        return self._reduce(torch.cat(grid, dim=1))

    def reduce_then_resample(self, maps: list[Tensor], factors: list[int], size: torch.Size) -> Tensor:
        """`concat_then_reduce` without building the concat: the scale and the 1x1 conv act
        per location and channel, the resampling per channel and location, so
        each map's block of the 1x1 conv can run at the map's own resolution and
        only out_channels channels are resampled, not sum C_i (the context
        module's 640 at stride 16 go 16x up otherwise: a third of a training step).
        Equal to it (without dropout) up to float rounding, and 3.5x faster for
        the default model's maps (bench/fused_skip_pool.py); the whole training
        step takes half the CPU time it did."""
        weight = self.reduce.weight.flatten(1)  # (out_channels, sum C_i)
        if self.scale is not None:
            weight = weight * self.scale  # column j times concat channel j's scale
        blocks = weight.split([m.shape[1] for m in maps], dim=1)
        # Maps on the same grid (conv5 and the context maps) are summed before
        # their one resampling.
        on_grid: dict[tuple[int, ...], Tensor] = {}
        for m, w, f in zip(maps, blocks, factors):
            key = (f, *m.shape[-2:])
            part = F.conv2d(m, w[:, :, None, None].contiguous())  # (1, out_channels, H_i, W_i)
            on_grid[key] = part if key not in on_grid else on_grid[key] + part
        fused = sum(resample_to(x, factor=key[0], size=size) for key, x in on_grid.items())
        return fused + self.reduce.bias.view(1, -1, 1, 1)

    def forward(self, maps: list[Tensor], rois: Tensor) -> Tensor:
        if self.fuse:
            (fused,) = maps
            return roi_pool_map(fused, rois, op=self.roi_op, output_size=self.pool_size,
                                stride=min(self.strides))  # (R, out_channels, S, S)
        return self._reduce(torch.cat(self.pool(maps, rois), dim=1))  # (R, out_channels, S, S)

    def _reduce(self, x: Tensor) -> Tensor:
        """Re-scale, dropout and the 1x1 conv (when there is one):
        Tensor[N, sum C_i, h, w] -> Tensor[N, out_channels, h, w]."""
        if self.scale is not None:
            x = x * (self.scale.view(1, -1, 1, 1) if self.scale.ndim else self.scale)
        x = self.dropout(x)
        return x if self.reduce is None else self.reduce(x)


def resample_to(x: Tensor, *, factor: int, size: torch.Size) -> Tensor:
    """Bilinear upsampling of a stride-(f*s) map Tensor[N, C, h, w] to the
    stride-s grid of `size` (H, W): cell centres stay at (i + 0.5) * stride,
    as in roi_align(aligned=True). VGG's floor-division pooling can leave the
    fine map one cell longer than factor * h: that edge cell repeats its neighbour."""
    if factor == 1:
        return x
    up = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    pad_h, pad_w = size[0] - up.shape[-2], size[1] - up.shape[-1]
    assert 0 <= pad_h < factor and 0 <= pad_w < factor, (tuple(x.shape), tuple(size), factor)
    if pad_h or pad_w:
        up = F.pad(up, (0, pad_w, 0, pad_h), mode="replicate")
    return up
