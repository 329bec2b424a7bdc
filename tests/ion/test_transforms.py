import numpy as np
import torch

from ion.data.transforms import normalize_image, prepare, resize_scale


def test_resize_scale_known_values():
    assert resize_scale(height=480, width=640, min_size=600, max_size=1000) == 600 / 480
    # 300x1000 would become 600x2000: the longer side caps the scale instead.
    assert resize_scale(height=300, width=1000, min_size=600, max_size=1000) == 1.0
    assert resize_scale(height=100, width=120, min_size=50, max_size=1000) == 0.5


def test_prepare_resizes_and_flips_image_boxes_and_masks():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    boxes = np.array([[0.0, 0.0, 10.0, 20.0]], np.float32)
    masks = np.zeros((1, 40, 60), bool)
    masks[0, :20, :10] = True
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    out = prepare(image, boxes, min_size=80, max_size=200, mean=mean, std=std, masks=masks)
    assert out.scale == 2.0 and out.image.shape == (1, 3, 80, 120)
    assert torch.equal(out.boxes, torch.tensor([[0.0, 0.0, 20.0, 40.0]]))
    assert out.masks.shape == (1, 80, 120) and out.masks[0, :40, :20].all() and out.masks.sum() == 800
    flipped = prepare(image, boxes, min_size=80, max_size=200, mean=mean, std=std, masks=masks, flip=True)
    assert torch.equal(flipped.boxes, torch.tensor([[100.0, 0.0, 120.0, 40.0]]))
    assert torch.equal(flipped.image, out.image.flip(-1))
    assert flipped.masks[0, :40, 100:].all() and flipped.masks.sum() == 800


def test_normalize_image_values():
    image = np.full((2, 3, 3), 255, np.uint8)
    image[..., 1] = 0
    x = normalize_image(image, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))
    assert x.shape == (1, 3, 2, 3)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, -2.0, 0.5]))
