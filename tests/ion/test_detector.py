import pytest
import torch
import torchvision

from ion.modeling.build import build_detector
from ion.modeling.config import ContextConfig, ModelConfig

K = 3


def small_config(**kw) -> ModelConfig:
    base = dict(width=0.125, batchnorm=True, context=ContextConfig(kind="irnn", hidden=8), fc_dim=64)
    base.update(kw)
    return ModelConfig(**base)


def scene(seed: int = 0):
    """A 64x96 image with two bright rectangles, their boxes, and proposals around them."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, 64, 96, generator=g) * 0.1
    boxes = torch.tensor([[8.0, 8.0, 40.0, 48.0], [50.0, 20.0, 90.0, 60.0]])
    image[:, 0, 8:48, 8:40] += 2.0
    image[:, 1, 20:60, 50:90] += 2.0
    jitter = (torch.rand(60, 4, generator=g) - 0.5) * 24
    proposals = (boxes.repeat(30, 1) + jitter).clamp(0, 96)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[0, 8:48, 8:40] = True
    masks[1, 20:60, 50:90] = True
    targets = {"boxes": boxes, "labels": torch.tensor([1, 3]), "iscrowd": torch.tensor([False, False]),
               "masks": masks}
    return image, proposals, targets


def test_shapes_of_every_block():
    torch.manual_seed(0)
    model = build_detector(small_config(pool_from=("conv5", "context", "conv3", "conv4")), num_classes=K)
    image, proposals, _ = scene()
    maps = model.feature_maps(image)
    # Concatenation order is canonical: conv3, conv4, conv5, then context.
    assert model.pool_from == ("conv3", "conv4", "conv5", "context")
    assert [m.shape for m in maps.pooled] == [(1, 32, 16, 24), (1, 64, 8, 12), (1, 64, 4, 6), (1, 64, 4, 6)]
    assert model.skip_pool.strides == (4, 8, 16, 16)
    pooled = model.skip_pool(maps.pooled, proposals)
    assert pooled.shape == (60, 64, 7, 7)  # reduce_channels defaults to conv5's
    logits, deltas = model.heads(pooled)
    assert logits.shape == (60, K + 1) and deltas.shape == (60, K, 4)
    assert model.heads.fc6.in_features == 64 * 7 * 7 and model.heads.fc6.out_features == 64
    model.eval()
    with torch.no_grad():
        scores, deltas = model(image, proposals)
    assert scores.shape == (60, K + 1) and deltas.shape == (60, K, 4)
    assert torch.allclose(scores.sum(dim=1), torch.ones(60))


def test_no_proposals_gives_no_outputs():
    model = build_detector(small_config(), num_classes=K).eval()
    image, _, _ = scene()
    scores, deltas = model(image, torch.zeros(0, 4))
    assert scores.shape == (0, K + 1) and deltas.shape == (0, K, 4)


def test_sgd_steps_on_one_image_drive_the_loss_down():
    torch.manual_seed(0)
    model = build_detector(small_config(seg_loss_weight=1.0), num_classes=K).train()
    image, proposals, targets = scene()
    opt = torch.optim.SGD(model.parameter_groups(), lr=0.01, momentum=0.9)
    totals = []
    for _ in range(10):
        losses = model(image, proposals, targets, generator=torch.Generator().manual_seed(0))
        assert set(losses) == {"cls", "bbox", "seg"}
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    # Only the first steps: momentum SGD on one image is chaotic later on (here the
    # loss jumps 1.86 -> 2.65 at step 19, and on another x86-64 processor, whose
    # float sums run in another order, the 25-step mean ended at 0.64 of the first
    # loss instead of below 0.6). Over 10 steps the trajectories have not parted
    # yet: measured 4.04 -> 2.63 (0.65 of the first); the bound 0.8 leaves a margin
    # far above float-order differences, and any step that went uphill overall fails it.
    assert min(totals) < 0.8 * totals[0], totals


def test_segmentation_head_runs_only_in_training():
    model = build_detector(small_config(seg_loss_weight=0.5), num_classes=K)
    calls = []
    model.seg_head.register_forward_hook(lambda *args: calls.append(1))
    image, proposals, targets = scene()
    model.train()
    losses = model(image, proposals, targets)
    assert "seg" in losses and len(calls) == 1
    model.eval()
    with torch.no_grad():
        out = model(image, proposals)
    assert isinstance(out, tuple) and len(calls) == 1
    without = build_detector(small_config(), num_classes=K).train()
    assert without.seg_head is None
    assert set(without(image, proposals, targets)) == {"cls", "bbox"}


def test_training_input_errors():
    model = build_detector(small_config(seg_loss_weight=1.0), num_classes=K).train()
    image, proposals, targets = scene()
    with pytest.raises(ValueError, match="needs targets"):
        model(image, proposals)
    del targets["masks"]
    with pytest.raises(ValueError, match="masks"):
        model(image, proposals, targets)


def test_image_without_objects_trains_with_zero_loss():
    model = build_detector(small_config(), num_classes=K).train()
    image, proposals, _ = scene()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "iscrowd": torch.zeros(0, dtype=torch.bool)}
    losses = model(image, proposals, empty)
    total = sum(losses.values())
    assert total.item() == 0.0
    total.backward()


def test_parameter_groups_cover_every_parameter_once():
    model = build_detector(small_config(), num_classes=K)
    decay, no_decay = model.parameter_groups()
    assert decay["weight_decay_mult"] == 1.0 and no_decay["weight_decay_mult"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.skip_pool.scale) in no_decay_ids
    assert id(model.heads.fc6.bias) in no_decay_ids and id(model.heads.fc6.weight) not in no_decay_ids


def test_fast_rcnn_baseline_pools_conv5_straight_into_fc6():
    """Tables 3 / 11 "FRCN": ROI pooling from conv5 only, no L2 norm, no scale, no 1x1 conv."""
    torch.manual_seed(0)
    cfg = small_config(pool_from=("conv5",), norm="none", reduce=False, context=ContextConfig(kind="none"))
    model = build_detector(cfg, num_classes=K).eval()
    assert model.skip_pool.reduce is None and model.skip_pool.scale is None and model.skip_pool.norm == "none"
    assert not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())
    assert model.heads.fc6.in_features == model.backbone.channels["conv5"] * 7 * 7

    image, proposals, _ = scene()
    seen = {}
    model.heads.fc6.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(image, proposals)
        conv5 = model.backbone(image)["conv5"]
        pool5 = torchvision.ops.roi_pool(conv5, [proposals], output_size=7, spatial_scale=1 / 16)
    assert torch.equal(seen["x"], pool5.flatten(1))


def test_fast_rcnn_switch_is_checked():
    with pytest.raises(ValueError, match="fuse: false"):
        small_config(pool_from=("conv5",), norm="channel", reduce=False, fuse=True,
                     context=ContextConfig(kind="none"))
    with pytest.raises(ValueError, match="drop it"):
        small_config(pool_from=("conv5",), norm="none", reduce=False, reduce_channels=64,
                     context=ContextConfig(kind="none"))
