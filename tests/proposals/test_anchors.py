"""Anchors: the paper's 22 shapes (Appendix item 2) and their placement on a
feature-map grid."""
import math

import torch

from proposals.anchors import anchor_shapes, grid_anchors, paper_anchor_shapes

# (width, height) of the Appendix's 22 anchors: 32x32, then per scale the
# ratios h/w = 0.5 (wide), 1, 2 (tall), each of area scale^2.
PAPER_WH = [
    (32.0, 32.0),
    (90.5097, 45.2548), (64.0, 64.0), (45.2548, 90.5097),
    (127.9863, 63.9932), (90.5, 90.5), (63.9932, 127.9863),
    (181.0193, 90.5097), (128.0, 128.0), (90.5097, 181.0193),
    (255.9727, 127.9863), (181.0, 181.0), (127.9863, 255.9727),
    (362.0387, 181.0193), (256.0, 256.0), (181.0193, 362.0387),
    (511.9453, 255.9727), (362.0, 362.0), (255.9727, 511.9453),
    (724.0773, 362.0387), (512.0, 512.0), (362.0387, 724.0773),
]


def test_paper_anchor_shapes_are_the_22_of_the_appendix():
    shapes = paper_anchor_shapes()
    assert shapes.shape == (22, 4) and shapes.dtype == torch.float32
    wh = torch.stack([shapes[:, 2] - shapes[:, 0], shapes[:, 3] - shapes[:, 1]], dim=1)
    torch.testing.assert_close(wh, torch.tensor(PAPER_WH), atol=1e-3, rtol=0)
    # centred at 0
    torch.testing.assert_close(shapes[:, :2], -shapes[:, 2:])


def test_anchor_ratio_is_height_over_width_and_area_is_scale_squared():
    shapes = anchor_shapes(base_size=0, ratios=(0.5, 2.0, 3.0), scales=(10.0,))
    w = shapes[:, 2] - shapes[:, 0]
    h = shapes[:, 3] - shapes[:, 1]
    torch.testing.assert_close(h / w, torch.tensor([0.5, 2.0, 3.0]))
    torch.testing.assert_close(w * h, torch.full((3,), 100.0))


def test_anchor_scale_multiplies_every_size():
    torch.testing.assert_close(paper_anchor_shapes(scale=0.25), paper_anchor_shapes() * 0.25)
    small = paper_anchor_shapes(scale=0.25)
    assert math.isclose(float(small[0, 2] - small[0, 0]), 8.0)


def test_grid_anchors_centred_on_cells_in_location_then_anchor_order():
    shapes = torch.tensor([[-4.0, -4.0, 4.0, 4.0], [-8.0, -2.0, 8.0, 2.0]])  # A = 2
    anchors = grid_anchors(shapes, height=2, width=3, stride=16)
    assert anchors.shape == (2 * 3 * 2, 4)
    # row (y * W + x) * A + a; centre ((x + 0.5) * 16, (y + 0.5) * 16)
    assert anchors[0].tolist() == [4.0, 4.0, 12.0, 12.0]  # y0 x0 a0, centre (8, 8)
    assert anchors[1].tolist() == [0.0, 6.0, 16.0, 10.0]  # y0 x0 a1
    assert anchors[2].tolist() == [20.0, 4.0, 28.0, 12.0]  # y0 x1 a0, centre (24, 8)
    assert anchors[(1 * 3 + 2) * 2 + 1].tolist() == [32.0, 22.0, 48.0, 26.0]  # y1 x2 a1, centre (40, 24)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    expected = torch.tensor([[(x + 0.5) * 16, (y + 0.5) * 16] for y in range(2) for x in range(3)
                             for _ in range(2)])
    torch.testing.assert_close(centres, expected)
