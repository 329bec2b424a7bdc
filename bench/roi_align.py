"""roi_align on the CPU, forward + backward and forward alone: torchvision's
kernel against the sparse-matrix form used for training and test (ion/ops/roi_align.py).

    .venv/bin/python -m bench.roi_align [--repeats 5] [--threads 2]

Sizes are the small CPU model's fused skip-pooling map (128 channels at
stride 4 and 8 of a ~240 px image) with the 64 ROIs sampled per training
image, and test-time counts of 600-650 ROIs (the default's ~640 mixed
proposals). The two variants run interleaved; the median over the repeats is
printed with the ratio.
"""
import argparse
import time

import torch
import torchvision

from bench.interleaved import interleaved_medians
from ion.ops.roi_align import roi_align_sparse

# (channels, map height, map width, stride, ROIs)
CASES = ((128, 56, 64, 4, 64), (128, 28, 32, 8, 64), (128, 28, 32, 8, 600), (128, 56, 72, 4, 650))
OUTPUT_SIZE, SAMPLING = 7, 2


def _rois(count: int, height: int, width: int, stride: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    size = torch.tensor([width * stride, height * stride], dtype=torch.float32)
    xy = torch.rand(count, 2, generator=g) * size * 0.7
    return torch.cat([xy, torch.minimum(xy + 8 + torch.rand(count, 2, generator=g) * 60, size)], dim=1)


def _variants(stride: int) -> dict:
    def tv(feat, boxes):
        return torchvision.ops.roi_align(feat, [boxes], output_size=OUTPUT_SIZE, spatial_scale=1 / stride,
                                         sampling_ratio=SAMPLING, aligned=True)

    def sparse(feat, boxes):
        return roi_align_sparse(feat, boxes, output_size=OUTPUT_SIZE, spatial_scale=1 / stride,
                                sampling_ratio=SAMPLING)
    return {"torchvision": tv, "sparse": sparse}


def _time_once(fn, feat: torch.Tensor, boxes: torch.Tensor, upstream: torch.Tensor | None) -> float:
    """Seconds for forward + backward, or for the forward alone under inference_mode (upstream None)."""
    start = time.perf_counter()
    if upstream is None:
        with torch.inference_mode():
            fn(feat, boxes)
    else:
        fn(feat, boxes).backward(upstream)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; roi_align {OUTPUT_SIZE}x{OUTPUT_SIZE}, "
          f"sampling {SAMPLING}, median ms")
    print(f"{'pass':>16} {'map':>16} {'ROIs':>5} {'torchvision':>12} {'sparse':>8} {'speed-up':>9}")
    for C, H, W, stride, R in CASES:
        feat = torch.randn(1, C, H, W, requires_grad=True)
        boxes = _rois(R, H, W, stride)
        for label, upstream in (("forward+backward", torch.randn(R, C, OUTPUT_SIZE, OUTPUT_SIZE)),
                                ("forward (test)", None)):
            variants = {name: (lambda fn=fn, upstream=upstream: _time_once(fn, feat, boxes, upstream))
                        for name, fn in _variants(stride).items()}
            ms = {name: 1e3 * s for name, s in interleaved_medians(variants, args.repeats).items()}
            print(f"{label:>16} {f'{C}x{H}x{W} /{stride}':>16} {R:>5} {ms['torchvision']:>12.1f} "
                  f"{ms['sparse']:>8.1f} {ms['torchvision'] / ms['sparse']:>8.2f}x")


if __name__ == "__main__":
    main()
