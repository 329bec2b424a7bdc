import pytest
import torch
import torchvision

from ion.errors import UserError
from ion.modeling.backbone import VGG16Backbone, load_vgg16_imagenet
from ion.modeling.heads import DetectionHeads, load_vgg16_fc67


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    """A torchvision VGG16 state_dict (random weights) saved as a file."""
    torch.manual_seed(0)
    state = torchvision.models.vgg16(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "vgg16.pth"
    torch.save(state, path)
    return path, state


def test_shapes_strides_and_channels_at_quarter_width():
    net = VGG16Backbone(width=0.25, conv67=True)
    feats = net(torch.randn(2, 3, 64, 96))
    expected = {"conv1": (16, 1), "conv2": (32, 2), "conv3": (64, 4), "conv4": (128, 8), "conv5": (128, 16),
                "conv7": (128, 16)}
    assert set(feats) == set(expected)
    for name, (channels, stride) in expected.items():
        assert net.channels[name] == channels and net.strides[name] == stride
        assert feats[name].shape == (2, channels, 64 // stride, 96 // stride)
        assert (feats[name] >= 0).all()  # taps are ReLU outputs


def test_no_conv7_without_conv67():
    net = VGG16Backbone(width=0.125)
    assert set(net(torch.randn(1, 3, 32, 32))) == {"conv1", "conv2", "conv3", "conv4", "conv5"}
    assert net.groups == ("conv1", "conv2", "conv3", "conv4", "conv5")


def test_layout_matches_torchvision_vgg16_without_pool5():
    with torch.device("meta"):  # shapes only: skips the 138M-parameter initialisation
        pairs = [(VGG16Backbone(width=1.0), torchvision.models.vgg16().features[:30]),
                 (VGG16Backbone(width=1.0, batchnorm=True), torchvision.models.vgg16_bn().features[:43])]
    for ours, theirs in pairs:
        assert ({k: v.shape for k, v in ours.features.state_dict().items()}
                == {k: v.shape for k, v in theirs.state_dict().items()})


def test_one_conv_per_block_keeps_strides_and_shapes():
    net = VGG16Backbone(width=0.25, block_convs=(1, 1, 1, 1, 1))
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128, 128]
    assert [c.in_channels for c in convs] == [3, 16, 32, 64, 128]
    feats = net(torch.randn(2, 3, 64, 96))
    expected = {"conv1": (16, 1), "conv2": (32, 2), "conv3": (64, 4), "conv4": (128, 8), "conv5": (128, 16)}
    assert set(feats) == set(expected)
    for name, (channels, stride) in expected.items():
        assert net.channels[name] == channels and net.strides[name] == stride
        assert feats[name].shape == (2, channels, 64 // stride, 96 // stride)
        assert (feats[name] >= 0).all()  # taps are ReLU outputs
    assert VGG16Backbone(width=0.25).block_convs == (2, 2, 3, 3, 3)


def test_block_convs_of_vgg11_match_torchvision_vgg11():
    with torch.device("meta"):
        ours = VGG16Backbone(width=1.0, block_convs=(1, 1, 2, 2, 2))
        theirs = torchvision.models.vgg11().features[:20]  # without pool5
    assert ({k: v.shape for k, v in ours.features.state_dict().items()}
            == {k: v.shape for k, v in theirs.state_dict().items()})


def test_loading_copies_every_conv_and_reproduces_torchvision(vgg16_file):
    path, state = vgg16_file
    net = VGG16Backbone(width=1.0, conv67=True)
    load_vgg16_imagenet(net, path)
    for key, value in net.features.state_dict(prefix="features.").items():
        assert torch.equal(value, state[key]), key
    with torch.device("meta"):
        reference = torchvision.models.vgg16().features[:30]
    reference.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")},
                              assign=True)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.allclose(net(x)["conv5"], reference(x), atol=1e-5)


def test_loading_fc6_fc7_into_heads(vgg16_file):
    path, state = vgg16_file
    with torch.device("meta"):  # skips initialising 120M parameters that the load overwrites
        heads = DetectionHeads(in_channels=512, pool_size=7, fc_dim=4096, num_classes=3)
    heads = heads.to_empty(device="cpu")
    load_vgg16_fc67(heads, path)
    assert torch.equal(heads.fc6.weight, state["classifier.0.weight"])
    assert torch.equal(heads.fc7.bias, state["classifier.3.bias"])


def test_loading_errors_name_file_and_key(vgg16_file, tmp_path):
    path, state = vgg16_file
    convs = {k: v for k, v in state.items() if k.startswith("features.")}
    missing = dict(convs)
    del missing["features.10.weight"]
    bad = tmp_path / "missing.pth"
    torch.save(missing, bad)
    with pytest.raises(UserError, match=r"missing\.pth.*'features\.10\.weight' is missing"):
        load_vgg16_imagenet(VGG16Backbone(width=1.0), bad)
    wrong = dict(convs)
    wrong["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    bad_shape = tmp_path / "shape.pth"
    torch.save(wrong, bad_shape)
    with pytest.raises(UserError, match=r"shape\.pth.*'features\.0\.weight' has shape \(64, 3, 5, 5\)"):
        load_vgg16_imagenet(VGG16Backbone(width=1.0), bad_shape)
    with pytest.raises(UserError, match=r"width 1\.0"):
        load_vgg16_imagenet(VGG16Backbone(width=0.25), path)
    with pytest.raises(UserError, match=r"block_convs \[2, 2, 3, 3, 3\].*block_convs \[1, 1, 1, 1, 1\]"):
        load_vgg16_imagenet(VGG16Backbone(width=1.0, block_convs=(1, 1, 1, 1, 1)), path)
    with pytest.raises(UserError, match=r"nope\.pth.*no such file"):
        load_vgg16_imagenet(VGG16Backbone(width=1.0), tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"garbage\.pth.*not a torch state_dict"):
        load_vgg16_imagenet(VGG16Backbone(width=1.0), garbage)


def _step(net: VGG16Backbone) -> dict[str, torch.Tensor]:
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    net(torch.randn(1, 3, 32, 32))["conv7"].sum().backward()
    opt.step()
    return before


def test_freezing_and_unfreezing():
    torch.manual_seed(0)
    net = VGG16Backbone(width=0.125, conv67=True)
    net.set_frozen(("conv1", "conv2", "conv6"))
    before = _step(net)
    frozen_prefixes = [f"features.{i}." for i in range(10)] + ["conv6."]  # conv1, conv2 = features 0..9
    for name, p in net.named_parameters():
        frozen = any(name.startswith(prefix) for prefix in frozen_prefixes)
        if frozen:
            assert p.grad is None and torch.equal(p, before[name]), name
        else:
            assert p.grad is not None and not torch.equal(p, before[name]), name
    net.set_frozen(())
    net.zero_grad(set_to_none=True)
    before = _step(net)
    for name, p in net.named_parameters():
        assert p.requires_grad and not torch.equal(p, before[name]), name


def test_frozen_batchnorm_keeps_running_statistics():
    net = VGG16Backbone(width=0.125, batchnorm=True)
    net.set_frozen(("conv1",))
    net.train()
    bn1, bn3 = net.features[1], net.features[15]  # conv1_1's and conv3_1's BatchNorm
    assert isinstance(bn1, torch.nn.BatchNorm2d) and isinstance(bn3, torch.nn.BatchNorm2d)
    mean1, mean3 = bn1.running_mean.clone(), bn3.running_mean.clone()
    net(torch.randn(1, 3, 32, 32) + 3)
    assert not bn1.training and torch.equal(bn1.running_mean, mean1)
    assert bn3.training and not torch.equal(bn3.running_mean, mean3)


def test_unknown_group_is_rejected():
    with pytest.raises(ValueError, match="conv9"):
        VGG16Backbone(width=0.125).set_frozen(("conv9",))


def test_build_detector_loads_imagenet_weights(vgg16_file):
    from ion.modeling.build import build_detector
    from ion.modeling.config import ContextConfig, ModelConfig

    path, state = vgg16_file
    cfg = ModelConfig(imagenet_weights=str(path), context=ContextConfig(kind="none"), pool_from=("conv4", "conv5"))
    model = build_detector(cfg, num_classes=2)
    assert torch.equal(model.backbone.features[28].weight, state["features.28.weight"])
    assert torch.equal(model.heads.fc6.weight, state["classifier.0.weight"])
    assert torch.equal(model.heads.fc7.weight, state["classifier.3.weight"])
