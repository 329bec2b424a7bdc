import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from ion.skip_pool import SkipPool

STRIDES = (4, 8, 16)
CHANNELS = (3, 5, 4)


def make_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(1, c, 96 // s, 128 // s, generator=g, dtype=dtype) for c, s in zip(CHANNELS, STRIDES)]
    xy = torch.rand(9, 2, generator=g, dtype=dtype) * torch.tensor([100.0, 70.0], dtype=dtype)
    rois = torch.cat([xy, xy + 8 + torch.rand(9, 2, generator=g, dtype=dtype) * 40], dim=1)
    return maps, rois


def by_hand(pool: SkipPool, maps, rois, *, op: str, norm: str, scale: float | None) -> torch.Tensor:
    pooled = []
    for m, s in zip(maps, STRIDES):
        if op == "roi_pool":
            x = torchvision.ops.roi_pool(m, [rois], output_size=7, spatial_scale=1 / s)
        else:
            x = torchvision.ops.roi_align(m, [rois], output_size=7, spatial_scale=1 / s, sampling_ratio=2,
                                          aligned=True)
        # Empty bins (ROI partly off the map) pool to 0: a zero vector stays 0.
        if norm == "blob":
            x = x / x.pow(2).sum(dim=(1, 2, 3), keepdim=True).sqrt().clamp(min=1e-12)
        elif norm == "channel":
            x = x / x.pow(2).sum(dim=1, keepdim=True).sqrt().clamp(min=1e-12)
        pooled.append(x)
    x = torch.cat(pooled, dim=1)
    if scale is not None:
        x = x * scale
    return F.conv2d(x, pool.reduce.weight, pool.reduce.bias)


@pytest.mark.parametrize("op,norm,scale", [("roi_pool", "blob", 1000.0), ("roi_pool", "channel", 130.0),
                                           ("roi_align", "blob", 1000.0), ("roi_pool", "none", None)])
def test_equals_per_layer_pooling_and_normalisation_by_hand(op, norm, scale):
    maps, rois = make_inputs()
    pool = SkipPool(in_channels=CHANNELS, strides=STRIDES, out_channels=6, roi_op=op, norm=norm).double()
    out = pool(maps, rois)
    assert out.shape == (9, 6, 7, 7)
    assert torch.allclose(out, by_hand(pool, maps, rois, op=op, norm=norm, scale=scale), rtol=1e-10, atol=1e-10)


def test_fixed_scale_is_a_constant_and_learned_scale_a_parameter():
    learned = SkipPool(in_channels=CHANNELS, strides=STRIDES, out_channels=6, norm="blob")
    assert isinstance(learned.scale, torch.nn.Parameter)
    assert torch.equal(learned.scale, torch.full((12,), 1000.0))
    channel = SkipPool(in_channels=CHANNELS, strides=STRIDES, out_channels=6, norm="channel")
    assert torch.equal(channel.scale, torch.full((12,), 130.0))
    fixed = SkipPool(in_channels=CHANNELS, strides=STRIDES, out_channels=6, norm="channel", scale_mode="fixed",
                     scale_init=50.0)
    assert not any(p is fixed.scale for p in fixed.parameters())
    assert fixed.scale.item() == 50.0
    none = SkipPool(in_channels=CHANNELS, strides=STRIDES, out_channels=6, norm="none")
    assert none.scale is None
    maps, rois = make_inputs(torch.float32)
    learned(maps, rois).sum().backward()
    assert learned.scale.grad is not None and learned.scale.grad.abs().sum() > 0


def test_reduce_conv_has_caffe_xavier_init():
    torch.manual_seed(0)
    pool = SkipPool(in_channels=(256, 44), strides=(8, 16), out_channels=200)
    w = pool.reduce.weight
    assert w.shape == (200, 300, 1, 1)
    assert w.abs().max() <= math.sqrt(3 / 300)
    assert abs(w.var().item() * 300 - 1.0) < 0.05  # variance 1 / fan_in
    assert torch.equal(pool.reduce.bias, torch.zeros(200))


def test_empty_rois_and_all_zero_rois_are_finite():
    maps, rois = make_inputs(torch.float32)
    pool = SkipPool(in_channels=CHANNELS, strides=STRIDES, out_channels=6)
    assert pool(maps, rois[:0]).shape == (0, 6, 7, 7)
    zero_maps = [torch.zeros_like(m) for m in maps]
    out = pool(zero_maps, rois)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, pool.reduce.bias.view(1, -1, 1, 1).expand_as(out))
