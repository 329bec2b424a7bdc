import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from ion.modeling.skip_pool import SkipPool, l2_normalize_rois, resample_to

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


def test_fused_equals_per_layer_when_all_maps_share_a_stride():
    # roi_align and the 1x1 conv are linear and roi_align's bilinear weights sum
    # to 1 inside the map, so with no norm and no resampling the order does not matter.
    g = torch.Generator().manual_seed(1)
    channels, strides = (3, 5, 4), (8, 8, 8)
    maps = [torch.rand(1, c, 12, 16, generator=g, dtype=torch.float64) for c in channels]
    xy = torch.tensor([[10.0, 12.0], [30.0, 20.0], [50.0, 8.0]], dtype=torch.float64)
    rois = torch.cat([xy, xy + torch.tensor([[40.0, 50.0], [25.0, 30.0], [60.0, 70.0]], dtype=torch.float64)], dim=1)
    kwargs = dict(in_channels=channels, strides=strides, out_channels=6, roi_op="roi_align", norm="none")
    plain = SkipPool(**kwargs).double()
    torch.nn.init.normal_(plain.reduce.bias)  # a non-zero bias must pool to itself
    fused = SkipPool(**kwargs, fuse=True).double()
    fused.load_state_dict(plain.state_dict())
    out = fused(fused.prepare(maps), rois)
    assert out.shape == (3, 6, 7, 7)
    assert torch.allclose(out, plain(plain.prepare(maps), rois), rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm, scale_mode", [("channel", "learned"), ("channel", "fixed"), ("none", "learned")])
def test_fused_map_reduced_before_resampling_equals_the_literal_concat(norm, scale_mode):
    # prepare() runs each map's block of the 1x1 conv at the map's own stride and
    # resamples the result; the spec's order resamples every channel, concats,
    # scales and reduces. Values and gradients must agree, odd edge cells included.
    g = torch.Generator().manual_seed(3)
    channels, strides = (3, 5, 4), (4, 8, 16)
    sizes = ((13, 17), (6, 8), (3, 4))  # VGG floor pooling: 13 = 2 * 6 + 1 and 17 = 2 * 8 + 1
    maps = [torch.rand(1, c, h, w, generator=g, dtype=torch.float64, requires_grad=True)
            for c, (h, w) in zip(channels, sizes)]
    pool = SkipPool(in_channels=channels, strides=strides, out_channels=6, roi_op="roi_align", norm=norm,
                    scale_mode=scale_mode, scale_init=2.5, fuse=True).double()
    torch.nn.init.normal_(pool.reduce.bias, generator=g)
    if pool.scale is not None and pool.scale.ndim:
        with torch.no_grad():
            pool.scale.uniform_(0.5, 3.0, generator=g)
    (fast,) = pool.prepare(maps)
    normed = [l2_normalize_rois(m, norm=norm) for m in maps]
    literal = pool.concat_then_reduce(normed, [1, 2, 4], torch.Size((13, 17)))
    assert fast.shape == literal.shape == (1, 6, 13, 17)
    assert torch.allclose(fast, literal, rtol=0, atol=1e-12)
    weights = torch.rand(fast.shape, generator=g, dtype=torch.float64)
    params = [*maps, pool.reduce.weight, pool.reduce.bias]
    if pool.scale is not None and pool.scale.requires_grad:
        params.append(pool.scale)
    for a, b in zip(torch.autograd.grad((fast * weights).sum(), params),
                    torch.autograd.grad((literal * weights).sum(), params)):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


def test_fused_map_with_dropout_in_training_masks_the_concat():
    # Dropout acts on concat entries, so training with it keeps the literal order:
    # with p = 1 every entry is dropped and the map is the bias; in eval mode it is not.
    maps = [torch.rand(1, 3, 8, 8), torch.rand(1, 4, 4, 4)]
    pool = SkipPool(in_channels=(3, 4), strides=(8, 16), out_channels=2, roi_op="roi_align", norm="channel",
                    dropout=1.0, fuse=True).train()
    torch.nn.init.normal_(pool.reduce.bias)
    bias = pool.reduce.bias.view(1, -1, 1, 1).expand(1, 2, 8, 8)
    (out,) = pool.prepare(maps)
    assert torch.equal(out, bias)
    (evaluated,) = pool.eval().prepare(maps)
    assert not torch.allclose(evaluated, bias)


def test_resample_to_keeps_cell_centres_and_replicates_the_odd_edge():
    h, w = 3, 4
    cols = (torch.arange(w, dtype=torch.float64) + 0.5) * 16  # image x of each stride-16 cell centre
    rows = (torch.arange(h, dtype=torch.float64) + 0.5) * 16
    coarse = torch.stack([cols.expand(h, w), rows[:, None].expand(h, w)])[None]  # (1, 2, h, w)
    up = resample_to(coarse, factor=2, size=torch.Size((2 * h + 1, 2 * w + 1)))
    assert up.shape == (1, 2, 2 * h + 1, 2 * w + 1)
    x, y = up[0, 0], up[0, 1]
    fine_cols = (torch.arange(2 * w, dtype=torch.float64) + 0.5) * 8
    fine_rows = (torch.arange(2 * h, dtype=torch.float64) + 0.5) * 8
    # Interior cells (both neighbours on the map) sit at (j + 0.5) * 8.
    assert torch.allclose(x[:, 1:2 * w - 1], fine_cols[1:2 * w - 1].expand(2 * h + 1, -1), rtol=0, atol=1e-9)
    assert torch.allclose(y[1:2 * h - 1], fine_rows[1:2 * h - 1, None].expand(-1, 2 * w + 1), rtol=0, atol=1e-9)
    # Edges clamp to the outermost coarse centres; the extra last row/column repeats its neighbour.
    assert torch.all(x[:, 0] == 8.0) and torch.all(x[:, 2 * w - 1:] == (w - 0.5) * 16)
    assert torch.all(y[0] == 8.0) and torch.all(y[2 * h - 1:] == (h - 0.5) * 16)
    assert resample_to(coarse, factor=1, size=coarse.shape[-2:]) is coarse


def test_fuse_rejects_blob_norm_and_prepare_shapes():
    with pytest.raises(ValueError, match="blob"):
        SkipPool(in_channels=CHANNELS, strides=STRIDES, out_channels=6, norm="blob", fuse=True)
    maps, rois = make_inputs(torch.float32)
    plain = SkipPool(in_channels=CHANNELS, strides=STRIDES, out_channels=6, norm="channel")
    prepared = plain.prepare(maps)
    assert len(prepared) == 3 and all(p is m for p, m in zip(prepared, maps))
    fused = SkipPool(in_channels=CHANNELS, strides=STRIDES, out_channels=6, norm="channel", roi_op="roi_align",
                     fuse=True)
    (one,) = fused.prepare(maps)
    assert one.shape == (1, 6, 24, 32)
    assert fused([one], rois).shape == (9, 6, 7, 7)
    # A 100x136 image: the stride-4 map (25x34) is one cell longer than 2x / 4x the coarser maps.
    g = torch.Generator().manual_seed(2)
    odd = [torch.rand(1, c, *size, generator=g) for c, size in zip(CHANNELS, [(25, 34), (12, 17), (6, 8)])]
    (one,) = fused.prepare(odd)
    assert one.shape == (1, 6, 25, 34) and torch.isfinite(one).all()


def test_gradients_reach_scale_and_reduce_through_the_fused_path():
    maps, rois = make_inputs(torch.float32)
    maps = [m.requires_grad_() for m in maps]
    fused = SkipPool(in_channels=CHANNELS, strides=STRIDES, out_channels=6, norm="channel", roi_op="roi_align",
                     fuse=True)
    fused(fused.prepare(maps), rois).sum().backward()
    for p in (fused.scale, fused.reduce.weight, fused.reduce.bias, *maps):
        assert p.grad is not None and p.grad.abs().sum() > 0
