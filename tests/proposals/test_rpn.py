"""The modified RPN (Appendix item 2): head and variant shapes, anchor
labelling and sampling, generation, checkpoints, and a short training on
synthetic rectangles that must raise recall well above the untrained net's."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ion.engine.checkpoint import CheckpointFiles
from ion.engine.loop import NonFiniteLossError
from ion.errors import UserError
from ion.ops.box_ops import box_iou, encode_boxes
from proposals.anchors import grid_anchors
from proposals.rpn.config import RpnConfig
from proposals.rpn.generate import generate_proposals, generate_proposals_all
from proposals.rpn.losses import IGNORE, NEGATIVE, POSITIVE, label_anchors, rpn_losses, sample_anchors
from proposals.rpn.model import RPN_BOX_WEIGHTS, build_rpn, flatten_head_outputs, load_rpn, rpn_input_size, save_rpn
from proposals.rpn.train import rpn_phases, rpn_state_dict, train_rpn

# A CPU-sized RPN: VGG16 at 1/8 width with batch norm (trained from scratch),
# 1/8-width head, anchors at 1/4 size (8..128 px) for ~100 px images.
TINY = RpnConfig(anchor_scale=0.25, backbone_width=0.125, head_width=0.125, batchnorm=True,
                 min_size=96, max_size=96, pre_nms_top_n=1000, post_nms_top_n=100)


def tiny_rpn(cfg: RpnConfig = TINY, seed: int = 0):
    torch.manual_seed(seed)
    return build_rpn(cfg).eval()


def rectangles(n: int, seed: int, size: int = 96):
    """`n` images of dark noise with 1-3 bright rectangles 16-47 px a side,
    as (image uint8 (size, size, 3), boxes float32 (G, 4), iscrowd bool (G,))."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        image = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
        boxes = []
        for _ in range(rng.integers(1, 4)):
            w, h = rng.integers(16, 48, size=2)
            x1, y1 = rng.integers(0, size - w), rng.integers(0, size - h)
            image[y1:y1 + h, x1:x1 + w] = rng.integers(160, 256, size=3)
            boxes.append([x1, y1, x1 + w, y1 + h])
        samples.append((image, np.array(boxes, np.float32), np.zeros(len(boxes), bool)))
    return samples


def recall_at(model, samples, cfg, variant, *, top: int, iou: float) -> float:
    """Fraction of ground-truth boxes covered (IoU >= iou) by one of the first `top` proposals."""
    found = total = 0
    for image, boxes, _ in samples:
        proposals, _ = generate_proposals(model, image, variant, cfg)
        total += len(boxes)
        if len(proposals):
            overlaps = box_iou(torch.from_numpy(boxes), torch.from_numpy(proposals[:top]))  # (G, P)
            found += int((overlaps.max(dim=1).values >= iou).sum())
    return found / total


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("height, width", [(64, 96), (70, 100)])
def test_forward_shapes_of_both_variants(height, width):
    model = tiny_rpn()
    outputs = model(torch.randn(2, 3, height, width))
    H5, W5 = height // 16, width // 16  # VGG16's floor pooling, 4 times
    for variant in ("rpn1", "rpn2"):
        objectness, deltas = outputs[variant]
        assert objectness.shape == (2, 22, H5, W5)
        assert deltas.shape == (2, 88, H5, W5)


def test_head_inputs_rpn1_is_conv5_rpn2_is_scaled_l2_normalised_conv4_and_conv5():
    model = tiny_rpn(replace(TINY, l2_scale=7.0))
    feats = model.backbone(torch.randn(1, 3, 64, 80))
    inputs = model.head_inputs(feats)
    assert torch.equal(inputs["rpn1"], feats["conv5"])
    c4, c5 = model.backbone.channels["conv4"], model.backbone.channels["conv5"]
    rpn2 = inputs["rpn2"]
    assert rpn2.shape == (1, c4 + c5, 4, 5)
    torch.testing.assert_close(rpn2[:, :c4], 7.0 * F.normalize(F.max_pool2d(feats["conv4"], 2), dim=1))
    torch.testing.assert_close(rpn2[:, c4:], 7.0 * F.normalize(feats["conv5"], dim=1))


def test_flatten_follows_grid_anchor_order():
    A, H, W = 3, 2, 4
    a, y, x = torch.meshgrid(torch.arange(A), torch.arange(H), torch.arange(W), indexing="ij")
    objectness = (a * 100 + y * 10 + x).float()[None]  # (1, A, H, W)
    channel = torch.arange(4 * A).view(4 * A, 1, 1)
    deltas = (channel * 100 + y[0] * 10 + x[0]).float()[None]  # (1, 4A, H, W); channel = 4a + k
    logits, flat = flatten_head_outputs(objectness, deltas)
    for yy in range(H):
        for xx in range(W):
            for aa in range(A):
                row = (yy * W + xx) * A + aa  # grid_anchors' order
                assert logits[0, row] == aa * 100 + yy * 10 + xx
                assert flat[0, row].tolist() == [(4 * aa + k) * 100 + yy * 10 + xx for k in range(4)]


# ------------------------------------------------------------------ labelling and sampling


def test_label_anchors_on_hand_made_boxes():
    gt = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],  # object 0
        [100.0, 100.0, 120.0, 120.0],  # object 1
        [50.0, 0.0, 90.0, 40.0],  # crowd
        [300.0, 300.0, 310.0, 310.0],  # object 3: no anchor touches it
    ])
    iscrowd = torch.tensor([False, False, True, False])
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],  # IoU 1.0 with object 0 -> positive
        [0.0, 0.0, 10.0, 8.0],  # IoU 0.8 -> positive
        [0.0, 0.0, 10.0, 5.0],  # IoU 0.5 -> ignored (between 0.3 and 0.7)
        [0.0, 0.0, 10.0, 2.0],  # IoU 0.2 -> negative
        [200.0, 200.0, 210.0, 210.0],  # no overlap -> negative
        [100.0, 100.0, 110.0, 125.0],  # IoU 200/450 = 0.44: object 1's best -> positive
        [110.0, 110.0, 130.0, 130.0],  # IoU 100/700 = 0.14 -> negative
        [55.0, 5.0, 65.0, 15.0],  # inside the crowd box -> ignored instead of negative
        [80.0, 0.0, 100.0, 20.0],  # half inside the crowd box (< 0.7) -> negative
        [100.0, 95.0, 110.0, 120.0],  # IoU 200/450 with object 1: tied best -> positive
    ])
    labels, matched = label_anchors(anchors=anchors, gt_boxes=gt, gt_iscrowd=iscrowd,
                                    pos_iou=0.7, neg_iou=0.3, crowd_ioa=0.7)
    P, N, X = POSITIVE, NEGATIVE, IGNORE
    assert labels.tolist() == [P, P, X, N, N, P, N, X, N, P]
    positive = labels == POSITIVE
    assert matched[positive].tolist() == [0, 0, 1, 1]


def test_label_anchors_without_objects():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    labels, _ = label_anchors(anchors=anchors, gt_boxes=torch.zeros(0, 4),
                              gt_iscrowd=torch.zeros(0, dtype=torch.bool), pos_iou=0.7, neg_iou=0.3,
                              crowd_ioa=0.7)
    assert labels.tolist() == [NEGATIVE, NEGATIVE]
    crowd_only, _ = label_anchors(anchors=anchors, gt_boxes=torch.tensor([[18.0, 18.0, 40.0, 40.0]]),
                                  gt_iscrowd=torch.tensor([True]), pos_iou=0.7, neg_iou=0.3, crowd_ioa=0.7)
    assert crowd_only.tolist() == [NEGATIVE, IGNORE]


@pytest.mark.parametrize("num_pos, num_neg, want_pos, want_neg", [
    (300, 1000, 128, 128),  # at most half positive
    (10, 1000, 10, 246),  # negatives fill up to 256
    (50, 0, 50, 0),  # not enough of either
    (0, 100, 0, 100),
])
def test_sample_anchors_limits(num_pos, num_neg, want_pos, want_neg):
    labels = torch.cat([torch.full((num_pos,), POSITIVE), torch.full((num_neg,), NEGATIVE),
                        torch.full((40,), IGNORE)])
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(1))]
    pos, neg = sample_anchors(labels, num=256, positive_fraction=0.5,
                              generator=torch.Generator().manual_seed(0))
    assert (pos.numel(), neg.numel()) == (want_pos, want_neg)
    assert len(set(pos.tolist())) == want_pos and len(set(neg.tolist())) == want_neg
    assert (labels[pos] == POSITIVE).all() and (labels[neg] == NEGATIVE).all()
    again = sample_anchors(labels, num=256, positive_fraction=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], pos) and torch.equal(again[1], neg)


def test_rpn_losses_delta_term_vanishes_at_the_encoded_targets():
    anchors = grid_anchors(torch.tensor([[-8.0, -8.0, 8.0, 8.0], [-16.0, -8.0, 16.0, 8.0]]),
                           height=4, width=4, stride=16)  # (32, 4)
    gt = torch.tensor([[10.0, 12.0, 30.0, 26.0], [36.0, 30.0, 60.0, 52.0]])
    crowd = torch.zeros(2, dtype=torch.bool)
    labels, matched = label_anchors(anchors=anchors, gt_boxes=gt, gt_iscrowd=crowd, pos_iou=0.7,
                                    neg_iou=0.3, crowd_ioa=0.7)
    assert (labels == POSITIVE).sum() >= 2
    exact = encode_boxes(boxes=gt[matched], rois=anchors, weights=RPN_BOX_WEIGHTS)
    cfg = RpnConfig()
    losses = rpn_losses(logits=torch.zeros(32), deltas=exact, anchors=anchors, gt_boxes=gt,
                        gt_iscrowd=crowd, cfg=cfg, generator=torch.Generator().manual_seed(0))
    assert float(losses["deltas"]) == pytest.approx(0.0, abs=1e-6)
    assert float(losses["objectness"]) == pytest.approx(float(np.log(2.0)), rel=1e-6)  # logit 0
    off = rpn_losses(logits=torch.zeros(32), deltas=exact + 0.5, anchors=anchors, gt_boxes=gt,
                     gt_iscrowd=crowd, cfg=cfg, generator=torch.Generator().manual_seed(0))
    assert float(off["deltas"]) > 0.1


# ------------------------------------------------------------------ generation


def test_generated_boxes_are_anchors_mapped_back_to_the_original_image():
    # Zero deltas and a high score only for the square anchor: the confident
    # proposals are exactly the square anchors of the resized image's grid,
    # divided by the resize factor 2 (48 x 72 -> 96 x 144, conv5 6 x 9).
    cfg = replace(TINY, anchor_base_size=32.0, anchor_scale=0.5, max_size=200, post_nms_top_n=200,
                  pre_nms_top_n=500)
    model = tiny_rpn(cfg)
    with torch.no_grad():
        for head in model.heads.values():
            head.deltas.weight.zero_()
            head.deltas.bias.zero_()
            head.objectness.weight.zero_()
            head.objectness.bias.fill_(-5.0)
            head.objectness.bias[0] = 5.0  # anchor 0: the 16 x 16 square (in resized pixels)
    image = np.random.default_rng(0).integers(0, 256, size=(48, 72, 3), dtype=np.uint8)
    assert rpn_input_size(height=48, width=72, min_size=96, max_size=200) == (96, 144)
    assert rpn_input_size(height=48, width=72, min_size=96, max_size=96) == (64, 96)  # longer side capped
    results = generate_proposals_all(model, image, cfg)
    expected = {(8.0 * x, 8.0 * y, 8.0 * x + 8, 8.0 * y + 8) for y in range(6) for x in range(9)}
    for variant in ("rpn1", "rpn2"):
        boxes, scores = results[variant]
        assert boxes.dtype == np.float32 and scores.dtype == np.float32
        confident = boxes[scores > 0.5]
        assert {tuple(b) for b in confident.tolist()} == expected


def test_generated_proposals_are_clipped_sorted_and_non_overlapping():
    model = tiny_rpn()
    image = np.random.default_rng(1).integers(0, 256, size=(80, 120, 3), dtype=np.uint8)
    cfg = replace(TINY, post_nms_top_n=40, min_box_size=3.0)
    boxes, scores = generate_proposals(model, image, "rpn2", cfg)
    assert boxes.shape == (40, 4) and scores.shape == (40,)
    assert (boxes[:, [0, 2]] >= 0).all() and (boxes[:, [0, 2]] <= 120).all()
    assert (boxes[:, [1, 3]] >= 0).all() and (boxes[:, [1, 3]] <= 80).all()
    assert (boxes[:, 2:] - boxes[:, :2] >= 3.0).all()
    assert (np.diff(scores) <= 0).all()
    iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(boxes)).fill_diagonal_(0)
    assert float(iou.max()) <= 0.7
    with pytest.raises(ValueError, match="unknown RPN variant"):
        generate_proposals(model, image, "rpn3", cfg)


# ------------------------------------------------------------------ checkpoints


def test_save_load_round_trip_and_architecture_check(tmp_path):
    model = tiny_rpn(seed=3)
    path = tmp_path / "rpn.pt"
    save_rpn(model, path, TINY)
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load_rpn(path, TINY)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for variant, (objectness, deltas) in model.eval()(x).items():
            assert torch.equal(loaded(x)[variant][0], objectness)
            assert torch.equal(loaded(x)[variant][1], deltas)
    with pytest.raises(UserError, match=r"rpn\.pt: .*proposals\.rpn\.head_width: saved 0\.125, config 0\.25"):
        load_rpn(path, replace(TINY, head_width=0.25))
    with pytest.raises(UserError, match=r"missing\.pt: RPN weights not found \(rerun the proposals stage"):
        load_rpn(tmp_path / "missing.pt", TINY)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"junk\.pt: not an RPN checkpoint"):
        load_rpn(tmp_path / "junk.pt", TINY)


# ------------------------------------------------------------------ training


def test_non_finite_loss_stops_training_naming_the_iteration():
    model = tiny_rpn()
    with torch.no_grad():
        model.heads["rpn2"].objectness.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"iteration 0 .*loss_rpn2/objectness=nan"):
        train_rpn(model, rectangles(2, seed=5), replace(TINY, iterations=3), seed=0)


def test_schedule_is_two_engine_phases_with_the_10x_step():
    phases = rpn_phases(replace(TINY, iterations=10, lr=0.03, lr_step=0.75))
    assert [(p.name, p.iterations, p.lr_start, p.lr_end) for p in phases] == [
        ("rpn", 8, 0.03, 0.03), ("rpn_step", 2, pytest.approx(0.003), pytest.approx(0.003))]
    assert [p.name for p in rpn_phases(replace(TINY, iterations=10, lr_step=1.0))] == ["rpn"]
    assert [p.name for p in rpn_phases(replace(TINY, iterations=10, lr_step=0.0))] == ["rpn_step"]


def test_short_training_raises_recall_well_above_untrained():
    cfg = replace(TINY, iterations=250, lr=0.03, log_every=10)
    train, held_out = rectangles(64, seed=1), rectangles(20, seed=2)
    model = tiny_rpn(cfg)
    before = {v: recall_at(model, held_out, cfg, v, top=50, iou=0.5) for v in ("rpn1", "rpn2")}
    seen = []
    result = train_rpn(model, train, cfg, seed=0, on_iteration=seen.append)
    assert seen == list(range(1, 251)) and result.iterations == 250
    history = result.history
    assert history[0]["lr"] == 0.03 and history[-1]["lr"] == pytest.approx(0.003)  # 10x step at 75%
    assert {k for k in history[0] if k.startswith("loss_")} == {
        "loss_rpn1/objectness", "loss_rpn1/deltas", "loss_rpn2/objectness", "loss_rpn2/deltas"}
    first = np.mean([h["loss"] for h in history[:2]])
    last = np.mean([h["loss"] for h in history[-2:]])
    assert last < 0.25 * first
    after = {v: recall_at(model, held_out, cfg, v, top=50, iou=0.5) for v in ("rpn1", "rpn2")}
    print(f"recall@50 IoU 0.5 before {before} after {after}")
    for variant in ("rpn1", "rpn2"):
        assert after[variant] >= 0.75, (before, after)
        assert after[variant] >= before[variant] + 0.3, (before, after)


def test_resumed_training_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path):
    cfg = replace(TINY, iterations=6, lr_step=0.5, images_per_batch=2, checkpoint_every=2)
    images = rectangles(5, seed=3)
    whole = tiny_rpn(cfg)
    train_rpn(whole, images, cfg, seed=4)
    # The first 2 updates, then a fresh process's view: a new model resumed from last.pt.
    files = CheckpointFiles(tmp_path)
    first = tiny_rpn(cfg)
    with pytest.raises(_Stopped):
        train_rpn(first, images, cfg, seed=4, save_checkpoint=_stop_after(files, iteration=2))
    resumed = tiny_rpn(cfg, seed=9)  # other initial weights: the checkpoint replaces them
    result = train_rpn(resumed, images, cfg, seed=4, resume=files.latest(), save_checkpoint=files)
    assert result.start_iteration == 2
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert all(torch.equal(rpn_state_dict(files.latest())[k], v) for k, v in whole.state_dict().items())


class _Stopped(Exception):
    pass


def _stop_after(files, *, iteration):
    """A checkpoint callback that saves, then stops the run (a kill right after a checkpoint)."""
    def save(state, event):
        where = files(state, event)
        if event.iteration == iteration:
            raise _Stopped(where)
        return where
    return save


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("fields, message", [
    ({"neg_iou": 0.8}, r"neg_iou \(0.8\) must be <= pos_iou \(0.7\)"),
    ({"min_size": 700, "max_size": 600}, r"min_size \(700\) must be <= max_size \(600\)"),
    ({"post_nms_top_n": 7000}, r"post_nms_top_n \(7000\) must be <= pre_nms_top_n \(6000\)"),
    ({"anchor_ratios": (1.0, -2.0)}, r"must all be > 0"),
    ({"anchor_scales": (), "anchor_base_size": 0.0}, r"no anchors"),
    ({"frozen": ("conv1", "conv9")}, r"unknown backbone groups \['conv9'\]"),
])
def test_config_cross_field_rules(fields, message):
    with pytest.raises(ValueError, match=message):
        RpnConfig(**fields)


def test_frozen_groups_get_no_gradient_in_training():
    model = tiny_rpn()
    conv1 = [p.detach().clone() for p in model.backbone.group_modules("conv1")[0].parameters()]
    train_rpn(model, rectangles(2, seed=6), replace(TINY, iterations=2, frozen=("conv1", "conv2")), seed=0)
    after = list(model.backbone.group_modules("conv1")[0].parameters())
    assert all(torch.equal(a, b) for a, b in zip(conv1, after))
    assert model.heads["rpn1"].conv3.weight.requires_grad
