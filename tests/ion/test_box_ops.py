import math

import torch

from ion.ops.box_ops import (
    box_ioa,
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_xywh,
    clip_boxes_xyxy,
    decode_boxes,
    encode_boxes,
    flip_boxes_xyxy,
    flip_deltas,
    remove_small,
)

WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def random_boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 100
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 50 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_xywh_xyxy_known_values_and_round_trip():
    xywh = torch.tensor([[10.0, 20.0, 5.0, 7.0]])
    assert torch.equal(box_xywh_to_xyxy(xywh), torch.tensor([[10.0, 20.0, 15.0, 27.0]]))
    boxes = random_boxes(20, 0)
    assert torch.allclose(box_xywh_to_xyxy(box_xyxy_to_xywh(boxes)), boxes)


def test_encode_decode_round_trip():
    rois, gt = random_boxes(50, 1), random_boxes(50, 2)
    deltas = encode_boxes(boxes=gt, rois=rois, weights=WEIGHTS)
    assert torch.allclose(decode_boxes(deltas=deltas, rois=rois, weights=WEIGHTS), gt, atol=1e-9)


def test_encode_known_values():
    roi = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    gt = torch.tensor([[1.0, 2.0, 11.0, 22.0]])  # shifted by (1, 2), same size
    d = encode_boxes(boxes=gt, rois=roi, weights=WEIGHTS)
    assert torch.allclose(d, torch.tensor([[10 * 1 / 10, 10 * 2 / 20, 0.0, 0.0]]))
    twice = torch.tensor([[0.0, 0.0, 20.0, 20.0]])  # same top-left, double width
    d = encode_boxes(boxes=twice, rois=roi, weights=WEIGHTS)
    assert torch.allclose(d, torch.tensor([[10 * 5 / 10, 0.0, 5 * math.log(2), 0.0]]))


def test_decode_broadcasts_class_specific_deltas():
    rois = random_boxes(6, 3)
    deltas = torch.randn(6, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = decode_boxes(deltas=deltas, rois=rois[:, None, :], weights=WEIGHTS)  # (6, 4, 4)
    for k in range(4):
        assert torch.allclose(out[:, k], decode_boxes(deltas=deltas[:, k], rois=rois, weights=WEIGHTS))


def test_decode_clamps_huge_scale_deltas():
    rois = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    out = decode_boxes(deltas=torch.tensor([[0.0, 0.0, 1e4, 1e4]]), rois=rois, weights=WEIGHTS)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0, 2] - out[0, 0], torch.tensor(1000.0))


def test_clip():
    boxes = torch.tensor([[-5.0, 3.0, 120.0, 90.0]])
    assert torch.equal(clip_boxes_xyxy(boxes, height=50, width=100), torch.tensor([[0.0, 3.0, 100.0, 50.0]]))


def test_flip_known_value_and_involution():
    box = torch.tensor([[10.0, 5.0, 30.0, 25.0]])
    assert torch.equal(flip_boxes_xyxy(box, width=100), torch.tensor([[70.0, 5.0, 90.0, 25.0]]))
    boxes = random_boxes(10, 4)
    assert torch.allclose(flip_boxes_xyxy(flip_boxes_xyxy(boxes, width=160), width=160), boxes)


def test_flip_deltas_matches_encoding_in_the_mirrored_image():
    rois, gt = random_boxes(30, 5), random_boxes(30, 6)
    d = encode_boxes(boxes=gt, rois=rois, weights=WEIGHTS)
    d_mirror = encode_boxes(boxes=flip_boxes_xyxy(gt, width=200), rois=flip_boxes_xyxy(rois, width=200),
                            weights=WEIGHTS)
    assert torch.allclose(flip_deltas(d_mirror), d, atol=1e-9)


def test_iou_and_ioa_known_values():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 9.0]])  # second has zero area
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 20.0, 20.0]])
    iou = box_iou(a, b)
    assert torch.allclose(iou[0], torch.tensor([50 / 150, 100 / 400]))
    ioa = box_ioa(a, b)
    assert torch.allclose(ioa[0], torch.tensor([0.5, 1.0]))
    assert torch.equal(ioa[1], torch.zeros(2))


def test_remove_small():
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [0.0, 0.0, 1.0, 5.0], [0.0, 0.0, 5.0, 2.0], [1.0, 1.0, 3.0, 3.0]])
    assert remove_small(boxes, min_size=2.0).tolist() == [0, 2, 3]
