"""IRNN context (ion/modeling/irnn.py, ion/modeling/context.py) and the segmentation
regulariser (ion/modeling/seg_head.py).

Fast path against reference path: the closed-form scan against the loop, the
batched learned-Whh scan against a per-row matrix-vector loop; the receptive
fields of Fig. 6; the shapes of every context kind; the seg head's upsampling
against bilinear interpolation and its targets on hand-made masks.
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from ion.modeling.config import ContextConfig
from ion.modeling.context import IRNNContext, build_context
from ion.modeling.irnn import (
    DIRECTIONS,
    FourDirectionIRNN,
    divide_by_steps,
    four_direction_scan,
    relu_scan_closed_form,
    relu_scan_loop,
    steps_taken,
)
from ion.modeling.seg_head import CROWD_LABEL, SEG_IGNORE, SegmentationHead, bilinear_kernel, seg_loss, seg_targets

SHAPES = [(2, 3, 4, 5), (1, 2, 1, 6), (1, 2, 5, 1), (1, 1, 1, 1), (2, 3, 7, 3)]


def _grads(fn, inputs, upstream):
    """Gradients of sum(fn(*inputs) * upstream) with respect to every input."""
    return torch.autograd.grad(fn(*inputs), inputs, upstream)


# ---------------------------------------------------------------- identity scan

def test_scan_known_values_in_every_direction():
    row = torch.tensor([1.0, -3.0, 2.0, 0.5], dtype=torch.float64)
    x = row.view(1, 1, 1, 4)
    out = four_direction_scan(x, directions=("right", "left"))  # (1, 2, 1, 4)
    # right: 1, max(1-3,0)=0, 2, 2.5; left starts at the end: 0.5, 2.5, max(2.5-3,0)=0, 1.
    assert out[0, 0, 0].tolist() == [1.0, 0.0, 2.0, 2.5]
    assert out[0, 1, 0].tolist() == [1.0, 0.0, 2.5, 0.5]
    column = four_direction_scan(row.view(1, 1, 4, 1), directions=("down", "up"))  # (1, 2, 4, 1)
    assert column[0, 0, :, 0].tolist() == [1.0, 0.0, 2.0, 2.5]
    assert column[0, 1, :, 0].tolist() == [1.0, 0.0, 2.5, 0.5]


@pytest.mark.parametrize("shape", SHAPES)
def test_closed_form_matches_loop_values_and_grads(shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, shape[1], dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(shape[0], 4 * shape[1], *shape[2:], dtype=torch.float64)

    def scan(method):
        return lambda x, b: four_direction_scan(x, first_step_bias=b, identity_scan=method)

    fast, slow = scan("closed_form")(x, bias), scan("loop")(x, bias)
    assert fast.shape == (shape[0], 4 * shape[1], *shape[2:])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    assert (fast == 0).any()  # the ReLU did reset somewhere: the test covers both branches
    for g_fast, g_slow in zip(_grads(scan("closed_form"), (x, bias), upstream),
                              _grads(scan("loop"), (x, bias), upstream)):
        torch.testing.assert_close(g_fast, g_slow, rtol=0, atol=1e-12)


def test_closed_form_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: relu_scan_closed_form(t, dim=-1), (x,))
    assert torch.autograd.gradcheck(lambda t: relu_scan_closed_form(t, dim=1), (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_closed_form_half_precision_accumulates_in_float32(dtype):
    # The prefix sum drops to -3000, far below h: in half precision S_j - min S
    # would lose the +0.25 steps entirely (fp16 spacing at 3000 is 2).
    x = torch.tensor([-3000.0, 0.25, 0.25, 0.25, -0.5, 1.0]).to(dtype)
    out = relu_scan_closed_form(x)
    assert out.dtype == dtype
    assert out.float().tolist() == relu_scan_loop(x.double()).float().tolist() == [0, 0.25, 0.5, 0.75, 0.25, 1.25]


# ---------------------------------------------------------------- learned Whh

def _naive_learned(x, weight, bias, directions):
    """Eq. 1 one sequence at a time: for each direction, image and row (or column), h = relu(W h + x)."""
    N, C, H, W = x.shape
    out = torch.zeros(N, len(directions) * C, H, W, dtype=x.dtype)
    for d, name in enumerate(directions):
        for n in range(N):
            lines = range(H) if name in ("right", "left") else range(W)
            for line in lines:
                length = W if name in ("right", "left") else H
                order = range(length) if name in ("right", "down") else reversed(range(length))
                h = torch.zeros(C, dtype=x.dtype)
                for step, pos in enumerate(order):
                    i, j = (line, pos) if name in ("right", "left") else (pos, line)
                    pre = weight[d] @ h + x[n, :, i, j]
                    if step == 0:
                        pre = pre + bias[d]
                    h = torch.relu(pre)
                    out[n, d * C:(d + 1) * C, i, j] = h
    return out


@pytest.mark.parametrize("directions", [DIRECTIONS, ("up", "right"), ("down",), ("left", "right")])
def test_learned_batched_matches_naive_loop(directions):
    torch.manual_seed(2)
    N, C, H, W = 2, 3, 3, 4
    D = len(directions)
    x = torch.randn(N, C, H, W, dtype=torch.float64, requires_grad=True)
    weight = (torch.eye(C) + 0.5 * torch.randn(D, C, C)).double().requires_grad_()
    bias = torch.randn(D, C, dtype=torch.float64, requires_grad=True)
    fast = four_direction_scan(x, directions=directions, recurrent_weight=weight, first_step_bias=bias)
    slow = _naive_learned(x, weight, bias, directions)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    assert (fast == 0).any() and (fast > 0).any()
    upstream = torch.randn_like(fast)
    for g_fast, g_slow in zip(torch.autograd.grad(fast, (x, weight, bias), upstream),
                              torch.autograd.grad(slow, (x, weight, bias), upstream)):
        torch.testing.assert_close(g_fast, g_slow, rtol=0, atol=1e-12)


def test_learned_layer_at_init_equals_identity_layer():
    torch.manual_seed(3)
    learned = FourDirectionIRNN(in_channels=5, hidden=4, recurrent="learned", first_step_bias=True).double()
    identity = FourDirectionIRNN(in_channels=5, hidden=4, recurrent="identity", first_step_bias=True).double()
    with torch.no_grad():
        learned.first_step_bias.normal_()
    identity.load_state_dict({k: v for k, v in learned.state_dict().items() if k != "recurrent_weight"})
    assert torch.equal(learned.recurrent_weight, torch.eye(4, dtype=torch.float64).expand(4, 4, 4))
    x = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    expected = learned(x)
    assert expected.shape == (2, 16, 4, 6)
    for scan in ("closed_form", "loop"):
        identity.identity_scan = scan
        torch.testing.assert_close(identity(x), expected, rtol=0, atol=1e-12)


def test_layer_rejects_bad_directions():
    with pytest.raises(ValueError, match="directions"):
        FourDirectionIRNN(in_channels=2, hidden=2, directions=("right", "right"))
    with pytest.raises(ValueError, match="directions"):
        FourDirectionIRNN(in_channels=2, hidden=2, directions=("north",))
    with pytest.raises(ValueError, match="identity_scan"):
        four_direction_scan(torch.zeros(1, 1, 2, 2), identity_scan="scan")


# ---------------------------------------------------------------- receptive field (Fig. 6)

def _dependency(module, shape):
    """Bool Tensor[H, W, H, W]: [i, j, k, l] is True where output cell (i, j) depends on input cell (k, l).

    Weights and inputs are positive, so no ReLU cuts a path that exists.
    """
    torch.manual_seed(4)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand_like(p) + 0.1)
    x = (torch.rand(shape, dtype=torch.float64) + 0.1).requires_grad_()
    out = module(x)
    out = out[-1] if isinstance(out, list) else out
    H, W = shape[2:]
    dep = torch.zeros(H, W, H, W, dtype=torch.bool)
    for i in range(H):
        for j in range(W):
            (g,) = torch.autograd.grad(out[:, :, i, j].sum(), x, retain_graph=True)
            dep[i, j] = g.abs().sum(dim=(0, 1)) > 0
    return dep


def _window(H, W, radius):
    """Bool Tensor[H, W, H, W]: |i - k| <= radius and |j - l| <= radius."""
    rows = torch.arange(H)
    cols = torch.arange(W)
    near_rows = (rows[:, None] - rows[None, :]).abs() <= radius  # (H, H)
    near_cols = (cols[:, None] - cols[None, :]).abs() <= radius  # (W, W)
    return near_rows[:, None, :, None] & near_cols[None, :, None, :]


@pytest.mark.parametrize("recurrent", ["identity", "learned"])
@pytest.mark.parametrize("variant", ["standard", "lr_then_ud"])
def test_two_irnns_see_the_whole_map(recurrent, variant):
    module = build_context(ContextConfig(kind="irnn", hidden=3, recurrent=recurrent, variant=variant),
                           in_channels=2).double()
    assert _dependency(module, (1, 2, 5, 6)).all()


def test_one_irnn_sees_its_row_and_column():
    layer = FourDirectionIRNN(in_channels=2, hidden=3, recurrent="identity").double()
    dep = _dependency(layer, (1, 2, 5, 6))
    rows, cols = torch.arange(5), torch.arange(6)
    same_row = (rows[:, None] == rows[None, :])[:, None, :, None].expand(5, 6, 5, 6)
    same_col = (cols[:, None] == cols[None, :])[None, :, None, :].expand(5, 6, 5, 6)
    assert torch.equal(dep, same_row | same_col)


@pytest.mark.parametrize("kind, radius", [("conv3", 2), ("conv5", 4)])
def test_two_convs_see_a_window(kind, radius):
    # Fig. 6 (a, b): two stacked 3x3 convs see 5x5 cells, two 5x5 convs 9x9.
    module = build_context(ContextConfig(kind=kind, channels=3), in_channels=2).double()
    H, W = 11, 12
    assert torch.equal(_dependency(module, (1, 2, H, W)), _window(H, W, radius))


def test_global_average_tiles_the_mean():
    module = build_context(ContextConfig(kind="global"), in_channels=3)
    x = torch.randn(2, 3, 4, 5)
    (out,) = module(x)
    torch.testing.assert_close(out, x.mean(dim=(2, 3), keepdim=True).expand(2, 3, 4, 5))
    assert out.is_contiguous()


# ---------------------------------------------------------------- context kinds

CASES = [
    (dict(kind="none"), []),
    (dict(kind="conv3"), [512]),
    (dict(kind="conv3", channels=6, pool_from_both=True), [6, 6]),
    (dict(kind="conv5"), [256]),
    (dict(kind="conv5", channels=5), [5]),
    (dict(kind="global"), [8]),
    # Settings of other kinds are ignored: an IRNN config switched to global or none.
    (dict(kind="global", pool_from_both=True, state_norm="steps", input_init="identity",
          pool_directions="separate"), [8]),
    (dict(kind="none", pool_from_both=True, pool_directions="separate"), []),
    (dict(kind="irnn", hidden=4), [8]),
    (dict(kind="irnn", hidden=4, recurrent="identity", first_step_bias=True), [8]),
    (dict(kind="irnn", hidden=4, pool_from_both=True), [16, 8]),
    (dict(kind="irnn", hidden=4, variant="lr_then_ud", pool_from_both=True), [8, 8]),
    (dict(kind="irnn", hidden=3, dropout=0.25), [8]),
    (dict(kind="irnn", hidden=4, state_norm="steps"), [8]),
    (dict(kind="irnn", hidden=4, pool_from_both=True, pool_directions="separate"), [4, 4, 4, 4, 8]),
    (dict(kind="irnn", hidden=4, variant="lr_then_ud", pool_from_both=True, pool_directions="separate"),
     [4, 4, 8]),
    (dict(kind="irnn", hidden=8, input_init="identity"), [8]),
]


@pytest.mark.parametrize("fields, channels", CASES)
def test_context_shapes_and_out_channels(fields, channels):
    module = build_context(ContextConfig(**fields), in_channels=8)
    assert module.out_channels == channels
    maps = module(torch.randn(2, 8, 5, 7))
    assert [tuple(m.shape) for m in maps] == [(2, c, 5, 7) for c in channels]


def test_irnn_context_layers_follow_fig3():
    module = build_context(ContextConfig(kind="irnn", hidden=6, variant="lr_then_ud"), in_channels=8)
    assert isinstance(module, IRNNContext)
    assert module.first.directions == ("right", "left") and module.second.directions == ("down", "up")
    assert module.first.input_to_hidden.weight.shape == (6, 8, 1, 1)
    assert module.second.input_to_hidden.weight.shape == (6, 12, 1, 1)
    assert module.output.weight.shape == (8, 12, 1, 1)
    assert module.first.recurrent_weight.shape == (2, 6, 6)


def test_context_dropout_only_in_training():
    torch.manual_seed(5)
    with_dropout = build_context(ContextConfig(kind="irnn", hidden=3, dropout=0.5), in_channels=4)
    without = build_context(ContextConfig(kind="irnn", hidden=3), in_channels=4)
    without.load_state_dict(with_dropout.state_dict())
    x = torch.randn(1, 4, 3, 5)
    assert not torch.equal(with_dropout.train()(x)[0], without.train()(x)[0])
    assert torch.equal(with_dropout.eval()(x)[0], without.eval()(x)[0])


def test_context_config_fields_follow_conventions():
    for f in dataclasses.fields(ContextConfig):
        assert f.default is not dataclasses.MISSING, f.name
        assert f.metadata.get("help"), f.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        ContextConfig().hidden = 3
    with pytest.raises(ValueError, match="pool_directions separate .* needs pool_from_both: true"):
        ContextConfig(kind="irnn", pool_directions="separate")
    with pytest.raises(ValueError, match="input_init identity needs context.hidden = conv5's channels \\(8\\)"):
        build_context(ContextConfig(kind="irnn", hidden=4, input_init="identity"), in_channels=8)


# ---------------------------------------------------------------- running means (state_norm steps)

def test_steps_taken_counts_the_cells_each_direction_has_read():
    def grid(direction, h, w):  # broadcast to the map it divides
        return steps_taken(direction, h, w).expand(1, 1, h, w)[0, 0].tolist()
    assert grid("right", 2, 4) == [[1, 2, 3, 4]] * 2
    assert grid("left", 2, 4) == [[4, 3, 2, 1]] * 2
    assert grid("down", 3, 2) == [[1, 1], [2, 2], [3, 3]]
    assert grid("up", 3, 2) == [[3, 3], [2, 2], [1, 1]]


def test_steps_norm_of_nonnegative_input_is_the_running_mean():
    """No resets on input >= 0, so each direction reads out the mean of the cells it scanned."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    out = divide_by_steps(four_direction_scan(x), DIRECTIONS)  # (2, 12, 4, 5)
    right, left, down, up = out.split(3, dim=1)
    for i in range(4):
        for j in range(5):
            torch.testing.assert_close(right[..., i, j], x[..., i, :j + 1].mean(-1))
            torch.testing.assert_close(left[..., i, j], x[..., i, j:].mean(-1))
            torch.testing.assert_close(down[..., i, j], x[..., :i + 1, j].mean(-1))
            torch.testing.assert_close(up[..., i, j], x[..., i:, j].mean(-1))


def test_identity_input_init_starts_the_first_layer_as_column_and_row_means():
    torch.manual_seed(1)
    module = build_context(ContextConfig(kind="irnn", hidden=3, recurrent="identity", state_norm="steps",
                                         input_init="identity", pool_from_both=True,
                                         pool_directions="separate"), in_channels=3).double()
    conv5 = torch.rand(1, 3, 5, 4, dtype=torch.float64)  # post-ReLU: >= 0
    right, left, down, up, top = module(conv5)
    torch.testing.assert_close(down[..., 4, 2], conv5[..., :, 2].mean(-1))  # the whole column above row 4
    torch.testing.assert_close(up[..., 0, 1], conv5[..., :, 1].mean(-1))
    torch.testing.assert_close(right[..., 2, 3], conv5[..., 2, :].mean(-1))
    torch.testing.assert_close(left[..., 1, 0], conv5[..., 1, :].mean(-1))
    assert top.shape == (1, 3, 5, 4)


def test_separate_directions_are_the_concat_split():
    torch.manual_seed(2)
    fields = dict(kind="irnn", hidden=2, pool_from_both=True)
    concat = build_context(ContextConfig(**fields), in_channels=5)
    separate = build_context(ContextConfig(**fields, pool_directions="separate"), in_channels=5)
    separate.load_state_dict(concat.state_dict())
    x = torch.randn(1, 5, 3, 4)
    (joined, top), parts = concat(x), separate(x)
    torch.testing.assert_close(torch.cat(parts[:4], dim=1), joined)
    torch.testing.assert_close(parts[4], top)


# ---------------------------------------------------------------- segmentation head

def _identity_head(channels):
    """A SegmentationHead whose score layer passes the features through."""
    head = SegmentationHead(in_channels=channels, num_classes_with_bg=channels).double()
    with torch.no_grad():
        head.score.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
    return head


@pytest.mark.parametrize("h, w, image_hw", [(3, 4, (48, 64)), (3, 4, (63, 79)), (3, 4, (37, 60)), (3, 4, (72, 88))])
def test_seg_head_upsamples_like_bilinear_interpolation(h, w, image_hw):
    # image_hw: 16x the features; floor(H/16) = h (torchvision VGG); ceil(H/16) = h; the largest allowed.
    torch.manual_seed(6)
    feats = torch.randn(2, 3, h, w, dtype=torch.float64)
    out = _identity_head(3)(feats, image_hw)
    H, W = image_hw
    assert out.shape == (2, 3, H, W)
    # Reference: interpolate the edge-padded map; pixel p of the image sits at
    # p + 16 of the padded one, and cell centres at 16 i + 7.5 in both.
    padded = F.pad(feats, (1, 2, 1, 2), mode="replicate")
    ref = F.interpolate(padded, scale_factor=16, mode="bilinear", align_corners=False)[:, :, 16:16 + H, 16:16 + W]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    if (H, W) == (16 * h, 16 * w):
        plain = F.interpolate(feats, scale_factor=16, mode="bilinear", align_corners=False)
        torch.testing.assert_close(out, plain, rtol=0, atol=1e-12)


def test_seg_head_rejects_an_image_its_features_do_not_cover():
    with pytest.raises(ValueError, match="larger than"):
        _identity_head(2)(torch.zeros(1, 2, 3, 4, dtype=torch.float64), (73, 64))


def test_seg_head_starts_at_uniform_scores():
    head = SegmentationHead(in_channels=5, num_classes_with_bg=4)
    assert head.upsample.weight.shape == (4, 1, 32, 32)
    assert torch.equal(head.upsample.weight[2, 0], bilinear_kernel(32))
    assert bilinear_kernel(32)[15, 15] == bilinear_kernel(32)[16, 16] == (1 - 0.5 / 16) ** 2
    logits = head(torch.randn(1, 5, 2, 3), (32, 48))
    target = torch.randint(0, 4, (1, 32, 48))
    assert math.isclose(seg_loss(logits, target).item(), math.log(4), rel_tol=1e-6)


def test_seg_targets_on_hand_made_masks():
    masks = torch.zeros(4, 6, 6, dtype=torch.uint8)
    masks[0, :4, :] = 1          # label 3, 24 pixels
    masks[1, 1:3, 1:3] = 1       # label 2, 4 pixels, inside mask 0: the smaller wins
    masks[2, :, 5] = 1           # crowd, 6 pixels, crosses mask 0
    masks[3, 2:4, 4:6] = 1       # label 1, 4 pixels, smaller than the crowd: wins over it
    labels = torch.tensor([3, 2, CROWD_LABEL, 1])
    expected = torch.tensor([
        [3, 3, 3, 3, 3, -1],
        [3, 2, 2, 3, 3, -1],
        [3, 2, 2, 3, 1, 1],
        [3, 3, 3, 3, 1, 1],
        [0, 0, 0, 0, 0, -1],
        [0, 0, 0, 0, 0, -1],
    ])
    assert SEG_IGNORE == -1
    assert torch.equal(seg_targets(masks, labels, (6, 6)), expected)
    # Resized to the image by nearest neighbour: every mask pixel becomes 2x2.
    assert torch.equal(seg_targets(masks.bool(), labels, (12, 12)),
                       expected.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_seg_targets_ties_and_empty():
    masks = torch.zeros(2, 3, 3, dtype=torch.bool)
    masks[0, 0, :2] = True
    masks[1, 0, 1:] = True
    assert seg_targets(masks, torch.tensor([5, 7]), (3, 3))[0].tolist() == [5, 7, 7]
    assert seg_targets(masks.flip(0), torch.tensor([7, 5]), (3, 3))[0].tolist() == [5, 5, 7]
    empty = seg_targets(torch.zeros(0, 4, 5, dtype=torch.bool), torch.zeros(0, dtype=torch.long), (8, 10))
    assert torch.equal(empty, torch.zeros(8, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be"):
        seg_targets(masks, torch.tensor([0, 1]), (3, 3))


def test_seg_loss_ignores_crowd_pixels():
    torch.manual_seed(7)
    logits = torch.randn(1, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0, 2, SEG_IGNORE], [1, SEG_IGNORE, 2]])
    valid = target >= 0
    log_p = logits[0].log_softmax(dim=0)  # (3, 2, 3)
    manual = -log_p.gather(0, target.clamp(min=0)[None])[0][valid].mean()
    torch.testing.assert_close(seg_loss(logits, target), manual, rtol=0, atol=1e-12)
    ignored = seg_loss(logits, torch.full((1, 2, 3), SEG_IGNORE))
    assert ignored.item() == 0.0
    ignored.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
