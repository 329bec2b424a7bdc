import torch

from ion.modeling.sampling import RoiSampler
from ion.ops.box_ops import box_ioa, box_iou, decode_boxes

GT = torch.tensor([[20.0, 20.0, 80.0, 80.0], [120.0, 40.0, 180.0, 140.0]])
LABELS = torch.tensor([3, 1])


def jittered(boxes: torch.Tensor, n: int, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = boxes[torch.randint(len(boxes), (n,), generator=g)]
    return base + (torch.rand(n, 4, generator=g) - 0.5) * 2 * spread


def proposals(seed: int = 0) -> torch.Tensor:
    return torch.cat([jittered(GT, 300, 6.0, seed), jittered(GT, 600, 45.0, seed + 1)]).clamp(0, 200)


def sample(props, gt=GT, labels=LABELS, crowd=None, seed=0, **kw):
    crowd = torch.zeros(len(gt), dtype=torch.bool) if crowd is None else crowd
    return RoiSampler(**kw).sample(proposals=props, gt_boxes=gt, gt_labels=labels, gt_iscrowd=crowd,
                                   generator=torch.Generator().manual_seed(seed))


def test_quota_iou_ranges_labels_and_targets():
    s = sample(proposals())
    assert s.rois.shape == (128, 4) and s.labels.shape == (128,) and s.box_targets.shape == (128, 4)
    fg = s.labels > 0
    assert fg.sum() == 32  # 25% of 128
    assert bool(fg[:32].all()) and not bool(fg[32:].any())  # foreground first
    iou = box_iou(s.rois, GT)
    max_iou, matched = iou.max(dim=1)
    assert (max_iou[fg] >= 0.5).all()
    assert ((max_iou[~fg] >= 0.1) & (max_iou[~fg] < 0.5)).all()
    assert torch.equal(s.labels[fg], LABELS[matched[fg]])
    decoded = decode_boxes(deltas=s.box_targets[fg], rois=s.rois[fg], weights=(10.0, 10.0, 5.0, 5.0))
    assert torch.allclose(decoded, GT[matched[fg]], atol=1e-3)
    assert torch.equal(s.box_targets[~fg], torch.zeros(96, 4))


def test_gt_boxes_join_the_candidates():
    far = torch.tensor([[150.0, 150.0, 190.0, 190.0]])  # overlaps nothing
    s = sample(far, fg_fraction=1.0)
    assert s.rois.shape == (2, 4)
    assert torch.equal(s.rois, GT) or torch.equal(s.rois, GT.flip(0))


def test_few_foreground_are_topped_up_with_background():
    props = jittered(GT, 400, 45.0, 3).clamp(0, 200)
    s = sample(props, fg_iou=0.9)
    fg = int((s.labels > 0).sum())
    assert fg < 32 and s.rois.shape[0] == 128


def test_seeded_generator_makes_the_sample_reproducible():
    props = proposals()
    a, b, c = sample(props, seed=5), sample(props, seed=5), sample(props, seed=6)
    assert torch.equal(a.rois, b.rois) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.rois, c.rois)


def test_crowd_boxes_are_never_targets_and_their_inside_is_never_background():
    crowd_box = torch.tensor([[100.0, 100.0, 200.0, 200.0]])
    gt = torch.cat([GT[:1], crowd_box])
    labels = torch.tensor([3, 2])
    crowd = torch.tensor([False, True])
    props = torch.cat([jittered(GT[:1], 200, 40.0, 1), jittered(crowd_box, 300, 30.0, 2)]).clamp(0, 200)
    s = sample(props, gt=gt, labels=labels, crowd=crowd, rois_per_image=512)
    assert (s.labels != 2).all()  # the crowd's class is never a target
    assert not (box_iou(s.rois, crowd_box)[:, 0] == 1.0).any()  # the crowd box is no candidate
    bg = s.labels == 0
    assert bg.any()
    assert (box_ioa(s.rois[bg], crowd_box)[:, 0] < 0.7).all()
    # Without the crowd flag the same region yields background inside it.
    plain = sample(props, gt=gt, labels=labels, crowd=torch.zeros(2, dtype=torch.bool), rois_per_image=512)
    plain_bg = plain.labels == 0
    assert (box_ioa(plain.rois[plain_bg], crowd_box)[:, 0] >= 0.7).any()


def test_image_without_ground_truth_gives_no_rois():
    s = sample(proposals(), gt=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
    assert s.rois.shape == (0, 4) and s.labels.shape == (0,) and s.box_targets.shape == (0, 4)
