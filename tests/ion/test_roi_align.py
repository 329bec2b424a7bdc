import pytest
import torch
import torchvision

from ion.modeling.skip_pool import ROI_ALIGN_SAMPLING, roi_pool_map
from ion.ops.roi_align import roi_align_sparse, sampling_matrix


def rois_around(*, count: int, height: int, width: int, stride: int, seed: int = 0) -> torch.Tensor:
    """ROIs of every size, some sticking out of the image (and the map) on any side."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([width * stride, height * stride], dtype=torch.float64)
    xy = torch.rand(count, 2, generator=g, dtype=torch.float64) * (size + 40) - 30
    wh = torch.rand(count, 2, generator=g, dtype=torch.float64) * size * 0.8
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("sampling", [1, 2, 3])
@pytest.mark.parametrize("stride", [4, 16])
def test_values_and_gradients_equal_torchvision(sampling, stride):
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(1, 5, 13, 17, generator=g, dtype=torch.float64, requires_grad=True)
    boxes = rois_around(count=40, height=13, width=17, stride=stride)
    expected = torchvision.ops.roi_align(feat, [boxes], output_size=7, spatial_scale=1 / stride,
                                         sampling_ratio=sampling, aligned=True)
    got = roi_align_sparse(feat, boxes, output_size=7, spatial_scale=1 / stride, sampling_ratio=sampling)
    assert got.shape == (40, 5, 7, 7)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    weights = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), feat)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), feat)
    torch.testing.assert_close(grad_got, grad_expected, rtol=0, atol=1e-12)


def test_rows_of_an_roi_inside_the_map_sum_to_one():
    boxes = torch.tensor([[10.0, 12.0, 60.0, 40.0]])
    m = sampling_matrix(boxes, height=10, width=12, output_size=7, spatial_scale=1 / 8, sampling_ratio=2).to_dense()
    assert m.shape == (49, 120)
    torch.testing.assert_close(m.sum(dim=1), torch.ones(49))
    assert (m >= 0).all()


def test_an_roi_far_outside_pools_zero_and_no_rois_give_an_empty_result():
    feat = torch.rand(1, 3, 6, 6, requires_grad=True)
    far = torch.tensor([[500.0, 500.0, 600.0, 600.0]])
    assert roi_align_sparse(feat, far, output_size=2, spatial_scale=1 / 8, sampling_ratio=2).abs().max() == 0
    empty = roi_align_sparse(feat, torch.zeros(0, 4), output_size=7, spatial_scale=1 / 8, sampling_ratio=2)
    assert empty.shape == (0, 3, 7, 7)


def test_skip_pooling_uses_it_on_the_cpu_for_training_and_test(monkeypatch):
    calls = []
    import ion.modeling.skip_pool as skip_pool

    def spy(*args, **kwargs):
        calls.append(1)
        return roi_align_sparse(*args, **kwargs)

    monkeypatch.setattr(skip_pool, "roi_align_sparse", spy)
    feat = torch.rand(1, 4, 8, 8)
    boxes = torch.tensor([[4.0, 4.0, 40.0, 30.0], [0.0, 10.0, 63.0, 20.0]])
    reference = torchvision.ops.roi_align(feat, [boxes], output_size=7, spatial_scale=1 / 8,
                                          sampling_ratio=ROI_ALIGN_SAMPLING, aligned=True)
    with torch.inference_mode():
        tested = roi_pool_map(feat, boxes, op="roi_align", output_size=7, stride=8)
    assert calls == [1]
    trained = roi_pool_map(feat.clone().requires_grad_(), boxes, op="roi_align", output_size=7, stride=8)
    assert calls == [1, 1]
    torch.testing.assert_close(tested, reference)
    torch.testing.assert_close(trained, reference)
