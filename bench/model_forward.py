"""Whole-model forward of the ION detector: one 600x1000 image with 2000
proposals (the paper's test setting), VGG16 (width 1) and the small CPU model (width 0.25).

    .venv/bin/python -m bench.model_forward [--repeats 3] [--devices cpu cuda] [--widths 1.0 0.25]
                                            [--proposals 2000] [--threads N]

Times `model(image, proposals)` in eval mode (backbone, IRNN context, skip
pooling from conv3/conv4/conv5/context, fc6/fc7, K = 80 classes) and, for
comparison, `predict_raw` with flip (two views, two regression rounds: 2
backbone passes, 5 head passes, resize and candidate extraction included).
On CUDA both run in float32 and under float16 autocast (AMP). Prints the
median images per second and the ratios side by side.
"""
import argparse
import time

import numpy as np
import torch

from bench.interleaved import interleaved_medians
from ion.inference.predict import predict_raw
from ion.modeling.build import build_detector
from ion.modeling.config import ContextConfig, ModelConfig

HEIGHT, WIDTH = 600, 1000
NUM_CLASSES = 80


def model_config(width: float) -> ModelConfig:
    """The paper's model at width 1; the small CPU variant (BatchNorm, IRNN
    hidden size scaled with the width) below it."""
    if width == 1.0:
        return ModelConfig()
    return ModelConfig(width=width, batchnorm=True, context=ContextConfig(hidden=max(8, round(512 * width))))


def random_proposals(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xy = rng.random((n, 2)) * [WIDTH * 0.8, HEIGHT * 0.8]
    wh = 16 + rng.random((n, 2)) * [WIDTH * 0.4, HEIGHT * 0.4]
    return np.concatenate([xy, np.minimum(xy + wh, [WIDTH, HEIGHT])], axis=1).astype(np.float32)


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(width: float, device: torch.device, repeats: int, num_proposals: int) -> dict[str, float]:
    """Median images per second of each variant at one width on one device."""
    torch.manual_seed(0)
    model = build_detector(model_config(width), num_classes=NUM_CLASSES).to(device).eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    proposals = random_proposals(num_proposals)
    # The image is already 600x1000: model input = the normalised image as is.
    x = ((torch.from_numpy(image).permute(2, 0, 1).float() / 255 - model.pixel_mean.cpu()[:, None, None])
         / model.pixel_std.cpu()[:, None, None])[None].to(device)
    rois = torch.from_numpy(proposals).to(device)
    amp_modes = ("off", "bf16") if device.type == "cuda" else ("off",)
    variants = {}
    for amp in amp_modes:
        suffix = f" {amp}" if amp != "off" else ""

        def forward(amp=amp):
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp != "off"):
                model(x, rois)

        def raw(amp=amp):
            predict_raw(model, image, proposals, min_size=HEIGHT, max_size=WIDTH, flip=True, amp=amp)

        variants["forward" + suffix] = forward
        variants["predict_raw flip" + suffix] = raw
    measures = {name: (lambda fn=fn: _timed(fn, device)) for name, fn in variants.items()}
    return {name: 1.0 / s for name, s in interleaved_medians(measures, repeats).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--widths", nargs="+", type=float, default=[1.0, 0.25])
    parser.add_argument("--proposals", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"one {HEIGHT}x{WIDTH} image, {args.proposals} proposals, K={NUM_CLASSES}, "
          f"{torch.get_num_threads()} CPU threads, median of {args.repeats}")
    rows = []
    for name in args.devices:
        if name == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped")
            continue
        device = torch.device(name)
        label = torch.cuda.get_device_name(device) if name == "cuda" else "cpu"
        for width in args.widths:
            for variant, ips in bench(width, device, args.repeats, args.proposals).items():
                rows.append((label, width, variant, ips))
                print(f"{label:>24}  width {width:<5} {variant:<22} {ips:8.3f} img/s  {1e3 / ips:9.1f} ms/img",
                      flush=True)
    base = {(label, variant): ips for label, width, variant, ips in rows if width == 1.0}
    if base:
        print("ratios to width 1.0 on the same device:")
        for label, width, variant, ips in rows:
            if width != 1.0 and (label, variant) in base:
                print(f"{label:>24}  width {width:<5} {variant:<22} {ips / base[(label, variant)]:6.1f}x")
    cpu = {(width, variant): ips for label, width, variant, ips in rows if label == "cpu"}
    gpu_rows = [r for r in rows if r[0] != "cpu"]
    if cpu and gpu_rows:
        print("ratios GPU / CPU:")
        for label, width, variant, ips in gpu_rows:
            key = (width, variant.replace(" bf16", ""))
            if key in cpu:
                print(f"{label:>24}  width {width:<5} {variant:<22} {ips / cpu[key]:7.1f}x")


if __name__ == "__main__":
    main()
