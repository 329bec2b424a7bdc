"""IRNN recurrence, forward + backward: closed form against the step loop (Whh = I),
and the learned-Whh scan, at conv5 sizes of a 600x1000 and an 800x1333 image.

    .venv/bin/python -m bench.irnn [--repeats 3] [--devices cpu cuda] [--threads 1] [--clock wall|process]

Times the recurrent part of one four-direction IRNN layer (the shared 1x1 conv
is the same in every variant) on its 512-channel input, N = 1.  The variants
run interleaved, so that a load spike on a shared machine hits them alike;
the median over the repeats is printed, with the ratios side by side.
"""
import argparse
import time

import torch

from bench.interleaved import interleaved_medians
from ion.modeling.irnn import DIRECTIONS, four_direction_scan

# conv5 (stride 16) of a 600x1000 and an 800x1333 image, the paper's test sizes
# (Caffe's ceil-mode pooling; torchvision's floor mode gives 37x62 and 50x83).
SIZES = {"600x1000": (38, 63), "800x1333": (50, 84)}
HIDDEN = 512


def _variants(hidden: int, device: torch.device) -> dict:
    eye = torch.eye(hidden, device=device).expand(len(DIRECTIONS), hidden, hidden).clone()
    return {
        "closed_form": dict(identity_scan="closed_form"),
        "loop": dict(identity_scan="loop"),
        "learned": dict(recurrent_weight=eye.requires_grad_()),
    }


def _time_once(x: torch.Tensor, upstream: torch.Tensor, kwargs: dict, clock) -> float:
    """Seconds for one forward + backward of the four-direction scan."""
    if x.is_cuda:
        torch.cuda.synchronize()
    start = clock()
    out = four_direction_scan(x, **kwargs)  # (1, 4*hidden, H, W)
    out.backward(upstream)
    if x.is_cuda:
        torch.cuda.synchronize()
    return clock() - start


def bench_size(device: torch.device, hw: tuple[int, int], repeats: int, clock=time.perf_counter) -> dict[str, float]:
    """Median milliseconds per variant at one conv5 size."""
    H, W = hw
    torch.manual_seed(0)
    x = torch.randn(1, HIDDEN, H, W, device=device, requires_grad=True)
    upstream = torch.randn(1, 4 * HIDDEN, H, W, device=device)
    variants = {name: (lambda kwargs=kwargs: _time_once(x, upstream, kwargs, clock))
                for name, kwargs in _variants(HIDDEN, device).items()}
    return {name: 1e3 * s for name, s in interleaved_medians(variants, repeats).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant at 600x1000 "
                        "(800x1333 runs half as many, at least 2; the GPU four times as many)")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"],
                        help="cuda is skipped when no GPU is available")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default); 1 by default because on a shared, "
                             "oversubscribed machine several OpenMP threads wait on each other and the "
                             "wall times swing tenfold")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="CPU runs: wall-clock time, or this process's CPU time (with --threads 1, "
                             "what the work costs however busy the machine is); GPU runs use wall time")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_clock = time.process_time if args.clock == "process" else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {args.clock} clock on the CPU; "
          f"forward + backward of the 4-direction recurrence, N=1, {HIDDEN} hidden; median ms")
    header = f"{'device':<6} {'image':<9} {'conv5':<10} {'closed':>8} {'loop':>8} {'learned':>8}" \
             f" {'loop/closed':>12} {'learned/closed':>15}"
    print(header)
    for device_name in args.devices:
        if device_name == "cuda" and not torch.cuda.is_available():
            print("cuda   (no GPU available: skipped)")
            continue
        device = torch.device(device_name)
        repeats = {"600x1000": args.repeats, "800x1333": max(2, args.repeats // 2)}
        for image, hw in SIZES.items():
            if device_name == "cpu":
                ms = bench_size(device, hw, repeats[image], clock=cpu_clock)
            else:
                ms = bench_size(device, hw, 4 * args.repeats)
            conv5 = f"{HIDDEN}x{hw[0]}x{hw[1]}"
            print(f"{device_name:<6} {image:<9} {conv5:<10} {ms['closed_form']:8.1f} {ms['loop']:8.1f}"
                  f" {ms['learned']:8.1f} {ms['loop'] / ms['closed_form']:11.2f}x"
                  f" {ms['learned'] / ms['closed_form']:14.2f}x", flush=True)


if __name__ == "__main__":
    main()
