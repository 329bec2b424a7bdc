"""bfloat16 autocast keeps what must stay exact in float32: the ROI coordinates
that pooling reads, and the learned IRNN's hidden state across its steps.

bfloat16 has 8 significant bits: between 512 and 1024 its spacing is 4 px, and
one rounding of a value is off by up to 2^-8 of it. The references are the same
computations in float32 on the same inputs, so the bounds below are the
rounding of the result to bfloat16, not a tolerance fitted to a processor.
"""
import pytest
import torch

from ion.modeling.build import build_detector
from ion.modeling.irnn import FourDirectionIRNN, four_direction_scan, relu_scan_learned
from tests.ion.test_detector import small_config

BF16_ROUNDING = 2.0 ** -8  # round-to-nearest into 8 significant bits: |error| <= 2^-8 |value|
# ROIs whose coordinates bfloat16 moves by up to 2 px (517.9 -> 516, 998.6 -> 1000).
ROIS_NEAR_1000 = torch.tensor([[517.9, 10.3, 998.6, 50.7],
                               [601.3, 3.1, 1013.7, 61.9],
                               [770.5, 20.2, 905.3, 40.6]])


@pytest.mark.parametrize("roi_op", ["roi_align", "roi_pool"])
def test_pooling_under_bf16_autocast_reads_the_float32_rois(roi_op):
    torch.manual_seed(0)
    model = build_detector(small_config(roi_op=roi_op, pool_from=("conv3", "conv4", "conv5", "context")),
                           num_classes=3).eval()
    assert not model.skip_pool.fuse
    image = torch.randn(1, 3, 64, 1024)
    seen = {}

    def record(module, args):
        seen["maps"], seen["rois"] = args

    model.skip_pool.register_forward_pre_hook(record)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(image, ROIS_NEAR_1000)
    maps, rois = seen["maps"], seen["rois"]
    assert maps[0].dtype == torch.bfloat16  # autocast's conv output: the maps are bfloat16
    assert rois.dtype == torch.float32 and torch.equal(rois, ROIS_NEAR_1000)
    # Pooled from the same (bfloat16-valued) maps, the features equal float32 pooling's.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = model.skip_pool.pool(maps, rois)
    with torch.no_grad():
        reference = model.skip_pool.pool([m.float() for m in maps], ROIS_NEAR_1000)
        rounded = model.skip_pool.pool([m.float() for m in maps], ROIS_NEAR_1000.bfloat16().float())
    for got, want in zip(pooled, reference):
        assert got.dtype == torch.float32 and torch.equal(got, want)
    # What bfloat16 ROIs would have pooled from the stride-4 conv3 map: half a cell off.
    assert (rounded[0] - reference[0]).abs().max() > 10 * BF16_ROUNDING * reference[0].abs().max()


def _steps_input(length=63, directions=2, batch=4, channels=16):
    """Non-negative inputs and a recurrent matrix near the identity: no ReLU resets,
    so the state grows along all 63 steps, as a running sum would."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(length, directions, batch, channels, generator=g)
    weight = torch.eye(channels) + 0.01 * torch.randn(directions, channels, channels, generator=g)
    return x, weight


def test_learned_scan_accumulates_bf16_inputs_in_float32():
    x, weight = _steps_input()
    x16 = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = relu_scan_learned(x16, weight)
        from_float_input = relu_scan_learned(x, weight)
    reference = relu_scan_learned(x16.float(), weight)  # float32 all the way, the same inputs
    assert got.dtype == torch.bfloat16 and from_float_input.dtype == torch.float32
    # Only the result is rounded: within one bfloat16 rounding of the float32 scan at every step.
    assert torch.all((got.float() - reference).abs() <= BF16_ROUNDING * reference.abs())
    assert torch.equal(from_float_input, relu_scan_learned(x, weight))  # autocast changes nothing
    # A bfloat16 state, rounded at each step, drifts far beyond one rounding by step 63.
    h, drift = x16[0], []
    for j in range(1, x.shape[0]):
        h = torch.relu(torch.baddbmm(x16[j], h, weight.bfloat16().transpose(1, 2)))
        drift.append(((h.float() - reference[j]).abs() / reference[j]).max())
    assert max(drift) > 4 * BF16_ROUNDING


def test_irnn_layer_over_63_steps_under_autocast_rounds_only_its_input_and_output():
    torch.manual_seed(0)
    layer = FourDirectionIRNN(in_channels=8, hidden=16, recurrent="learned")
    with torch.no_grad():
        layer.recurrent_weight.add_(0.01 * torch.randn_like(layer.recurrent_weight))
    x = torch.rand(1, 8, 5, 63)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        hidden_in = layer.input_to_hidden(x)  # the bfloat16 input-to-hidden output the scan reads
    with torch.no_grad():
        reference = four_direction_scan(
            hidden_in.float(), directions=layer.directions, recurrent_weight=layer.recurrent_weight)
    assert got.dtype == torch.bfloat16 and got.shape == (1, 64, 5, 63)
    assert torch.all((got.float() - reference).abs() <= BF16_ROUNDING * reference.abs())
