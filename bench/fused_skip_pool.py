"""Fused skip pooling, forward + backward: the 1x1 conv run per map before
resampling (`SkipPool.reduce_then_resample`, what `prepare` does) against the
spec's order of resampling every channel, concatenating and reducing
(`concat_then_reduce`).

    .venv/bin/python -m bench.fused_skip_pool [--repeats 5] [--threads 2] [--devices cpu cuda]

Two shapes: the embedded default (224x288 image, 1/4-width VGG16, conv3/conv4/
conv5 + the IRNN's four direction maps and top map at stride 16) and the
paper's (600x1000, full width, conv3/conv4/conv5 + the top context map). The
variants run interleaved; the median is printed with the ratio side by side.
"""
import argparse
import time

import torch

from bench.interleaved import interleaved_medians
from ion.modeling.skip_pool import SkipPool

# name -> (image H, W, [(channels, stride)] in pool_from order, out_channels)
SHAPES = {
    "default 224x288": (224, 288, [(64, 4), (128, 8), (128, 16)] + [(128, 16)] * 5, 128),
    "paper 600x1000": (600, 1000, [(256, 4), (512, 8), (512, 16), (512, 16)], 512),
}


def _inputs(H: int, W: int, layers: list[tuple[int, int]], device: torch.device) -> list[torch.Tensor]:
    # torchvision VGG's floor-mode pooling: stride-s map of an H x W image is H // s x W // s.
    return [torch.rand(1, c, H // s, W // s, device=device, requires_grad=True) for c, s in layers]


def _time_once(method, maps: list[torch.Tensor], factors: list[int], size: torch.Size) -> float:
    if maps[0].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = method(maps, factors, size)  # (1, out_channels, H / 4, W / 4)
    out.sum().backward()
    if maps[0].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_shape(name: str, device: torch.device, repeats: int) -> dict[str, float]:
    """Median milliseconds per order at one shape."""
    H, W, layers, out_channels = SHAPES[name]
    torch.manual_seed(0)
    pool = SkipPool(in_channels=tuple(c for c, _ in layers), strides=tuple(s for _, s in layers),
                    out_channels=out_channels, roi_op="roi_align", norm="channel", fuse=True).to(device)
    maps = _inputs(H, W, layers, device)
    factors = [s // 4 for _, s in layers]
    size = maps[0].shape[-2:]
    variants = {name: (lambda method=getattr(pool, name): _time_once(method, maps, factors, size))
                for name in ("reduce_then_resample", "concat_then_reduce")}
    return {name: 1e3 * s for name, s in interleaved_medians(variants, repeats).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'device':6} {'shape':18} {'reduce->resample ms':>20} {'concat->reduce ms':>18} {'speed-up':>9}")
    for dev in args.devices:
        for name in SHAPES:
            ms = bench_shape(name, torch.device(dev), args.repeats)
            fast, literal = ms["reduce_then_resample"], ms["concat_then_reduce"]
            print(f"{dev:6} {name:18} {fast:20.1f} {literal:18.1f} {literal / fast:8.2f}x")


if __name__ == "__main__":
    main()
