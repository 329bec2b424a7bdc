"""The IRNN context's switches (ion/modeling/context.py, ion/modeling/irnn.py):
depth (Table 8: 1, 2 or 3 stacked layers) and unshared input-to-hidden
transitions (Sec. 3.2), each tested for the behaviour it names; the default is
the two-layer stack of Fig. 3 with its checkpoint keys."""
import pytest
import torch

from ion.modeling.config import ContextConfig
from ion.modeling.context import IRNNContext, build_context
from ion.modeling.irnn import FourDirectionIRNN, four_direction_scan


def _two_layers_by_hand(module: IRNNContext, conv5: torch.Tensor) -> torch.Tensor:
    """The two-layer context of Fig. 3 from the scan primitive: shared 1x1 conv,
    four-direction scan, twice, then the output 1x1 conv."""
    x = conv5
    for layer in (module.first, module.second):
        x = four_direction_scan(layer.input_to_hidden(x), directions=layer.directions,
                                recurrent_weight=layer.recurrent_weight, first_step_bias=layer.first_step_bias)
    return module.output(x)


def test_default_context_is_the_two_layer_stack_with_its_checkpoint_keys():
    torch.manual_seed(0)
    module = build_context(ContextConfig(kind="irnn", hidden=6), in_channels=8)
    assert module.layer_names == ("first", "second")
    assert {k.split(".")[0] for k in module.state_dict()} == {"first", "second", "output"}
    conv5 = torch.rand(2, 8, 5, 7)
    assert torch.equal(module(conv5)[0], _two_layers_by_hand(module, conv5))


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_depth_sets_the_number_of_recurrent_layers(layers):
    torch.manual_seed(0)
    module = build_context(ContextConfig(kind="irnn", hidden=6, layers=layers), in_channels=8)
    irnns = [m for m in module.modules() if isinstance(m, FourDirectionIRNN)]
    assert len(irnns) == layers
    assert module.output.weight.shape == (8, 4 * 6, 1, 1)
    conv5 = torch.rand(1, 8, 5, 7)
    (top,) = module(conv5)
    x = conv5
    for irnn in irnns:
        x = irnn(x)
    assert torch.equal(top, module.output(x))


def test_depth_changes_the_output_and_one_layer_sees_only_its_row_and_column():
    torch.manual_seed(0)
    one = build_context(ContextConfig(kind="irnn", hidden=6, layers=1), in_channels=8)
    torch.manual_seed(0)
    two = build_context(ContextConfig(kind="irnn", hidden=6, layers=2), in_channels=8)
    conv5 = torch.rand(1, 8, 5, 7, requires_grad=True)
    assert not torch.allclose(one(conv5)[0], two(conv5)[0])
    # Fig. 6 (d): one layer's cell (0, 0) depends on row 0 and column 0 only; two layers', on every cell.
    (grad_one,) = torch.autograd.grad(one(conv5)[0][0, :, 0, 0].sum(), conv5)
    (grad_two,) = torch.autograd.grad(two(conv5)[0][0, :, 0, 0].sum(), conv5)
    reached_one = grad_one.abs().sum(1)[0] > 0  # (H, W)
    assert not reached_one[1:, 1:].any() and reached_one[0].any() and reached_one[:, 0].any()
    assert (grad_two.abs().sum(1)[0] > 0)[1:, 1:].any()


def test_unshared_input_to_hidden_has_one_conv_per_direction():
    torch.manual_seed(0)
    shared = FourDirectionIRNN(in_channels=8, hidden=6)
    unshared = FourDirectionIRNN(in_channels=8, hidden=6, input_to_hidden="per_direction")
    assert len(shared.input_convs()) == 1
    convs = unshared.input_convs()
    assert len(convs) == 4 and len({id(c) for c in convs}) == 4
    assert not any(torch.equal(a.weight, b.weight) for i, a in enumerate(convs) for b in convs[i + 1:])
    assert sum(isinstance(m, torch.nn.Conv2d) for m in unshared.modules()) == 4
    assert sum(isinstance(m, torch.nn.Conv2d) for m in shared.modules()) == 1
    # Each direction scans its own conv's output: equal to the shared layer whose conv is that direction's.
    x = torch.rand(1, 8, 5, 7)
    out = unshared(x)
    for k, conv in enumerate(convs):
        shared.input_to_hidden.load_state_dict(conv.state_dict())
        assert torch.allclose(out[:, 6 * k:6 * (k + 1)], shared(x)[:, 6 * k:6 * (k + 1)], atol=1e-6)


def test_unshared_identity_input_init_sets_every_direction():
    module = build_context(ContextConfig(kind="irnn", hidden=8, input_init="identity",
                                         input_to_hidden="per_direction"), in_channels=8)
    for conv in module.first.input_convs():
        assert torch.equal(conv.weight.flatten(1), torch.eye(8))


def test_lr_then_ud_needs_two_layers():
    with pytest.raises(ValueError, match="layers: 2"):
        ContextConfig(kind="irnn", variant="lr_then_ud", layers=3)
