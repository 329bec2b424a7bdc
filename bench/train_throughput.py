"""Training throughput (images/s) of ion.train_loop.train, side by side.

    .venv/bin/python -m bench.train_throughput [--iterations N]

CPU: the embedded-default-sized detector (VGG16 width 0.25 with BatchNorm,
256 px images, 500 proposals, 128 sampled ROIs): the full loop against a bare
forward/backward/step loop over the same images (the loop's own overhead:
seeding, clipping, Caffe momentum rescaling, logging, loading ahead).
CUDA (when present): the full VGG16 ION (conv1-conv5 + IRNN context, skip
pooling from conv3/4/5 + context; and with conv6/conv7) at 600x1000 with
2000 proposals, 128 sampled, 4 images per update, one worker: fp32 against
bf16 and fp16 AMP. (AMP on the CPU is not measured: torchvision's CPU
roi_pool has no bfloat16 kernel.)
Timings exclude a warm-up; every image is synthetic (made once, reused).
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from ion.engine.loop import TrainSample, train
from ion.modeling.build import build_detector
from ion.modeling.config import InputConfig, ModelConfig, RoiSamplingConfig
from stages.train_config import PhaseConfig

NUM_CLASSES = 6
NUM_GT = 8


def synthetic_samples(*, count: int, height: int, width: int, num_proposals: int, seed: int = 0) -> list[TrainSample]:
    """`count` random images with random proposals and ground truth (resized-image coordinates)."""
    g = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        def boxes(n: int) -> torch.Tensor:
            xy = g.uniform(0, [width - 16, height - 16], size=(n, 2))
            wh = g.uniform(8, [width / 3, height / 3], size=(n, 2))
            return torch.from_numpy(np.concatenate([xy, np.minimum(xy + wh, [width, height])], 1).astype(np.float32))
        gt = boxes(NUM_GT)
        # Half the proposals jittered around the ground truth, so the sampler finds foreground.
        near = gt[torch.from_numpy(g.integers(0, NUM_GT, num_proposals // 2))]
        near = near + torch.from_numpy(g.normal(0, 4, size=near.shape).astype(np.float32))
        proposals = torch.cat([near.clamp(min=0), boxes(num_proposals - num_proposals // 2)])
        image = torch.from_numpy(g.standard_normal((1, 3, height, width)).astype(np.float32))
        targets = {"boxes": gt, "labels": torch.from_numpy(g.integers(1, NUM_CLASSES + 1, NUM_GT)),
                   "iscrowd": torch.zeros(NUM_GT, dtype=torch.bool)}
        samples.append(TrainSample(image=image, proposals=proposals, targets=targets))
    return samples


def loop_images_per_s(cfg: ModelConfig, samples: list[TrainSample], *, iterations: int, amp: str,
                      device: torch.device, warmup: int = 1) -> float:
    """images/s of ion.train_loop.train (one phase, nothing frozen, 4 images per update)."""
    torch.manual_seed(0)
    model = build_detector(cfg, num_classes=NUM_CLASSES)
    phase = PhaseConfig(name="bench", iterations=warmup + iterations, lr_start=1e-3, lr_end=1e-3)
    marks: list[float] = []

    def on_iteration(i: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    train(model=model, phases=(phase,), num_images=len(samples), get_sample=lambda i, p, rng: samples[i], seed=0,
          save_checkpoint=lambda state, event: "not saved", on_iteration=on_iteration, images_per_batch=4,
          checkpoint_every=10**9, log_every=10**9, amp=amp, device=device, loader_threads=1)
    return 4 * iterations / (marks[-1] - marks[warmup - 1])


def bare_images_per_s(cfg: ModelConfig, samples: list[TrainSample], *, iterations: int,
                      device: torch.device) -> float:
    """images/s of a plain accumulate-and-step loop over the same images (fp32)."""
    torch.manual_seed(0)
    model = build_detector(cfg, num_classes=NUM_CLASSES).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    started = 0.0
    for it in range(1 + iterations):
        if it == 1:
            started = time.perf_counter()
        optimizer.zero_grad()
        for j in range(4):
            s = samples[(4 * it + j) % len(samples)]
            targets = {k: v.to(device) for k, v in s.targets.items()}
            losses = model(s.image.to(device), s.proposals.to(device), targets)
            sum(losses.values()).backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 4 * iterations / (time.perf_counter() - started)


def cpu_report(iterations: int) -> None:
    cfg = ModelConfig(width=0.25, batchnorm=True, input=InputConfig(min_size=256, max_size=256),
                      sampling=RoiSamplingConfig(rois_per_image=128))
    samples = synthetic_samples(count=8, height=256, width=256, num_proposals=500)
    cpu = torch.device("cpu")
    print(f"CPU ({torch.get_num_threads()} threads), VGG16 width 0.25 + BN, 256x256, 500 proposals, 128 ROIs, "
          f"4 images/update, {iterations} updates", flush=True)
    bare = bare_images_per_s(cfg, samples, iterations=iterations, device=cpu)
    print(f"  bare forward/backward/step loop  {bare:7.2f} img/s", flush=True)
    fp32 = loop_images_per_s(cfg, samples, iterations=iterations, amp="off", device=cpu)
    print(f"  ion.train_loop.train fp32        {fp32:7.2f} img/s   loop / bare = {fp32 / bare:.2f}", flush=True)


def cuda_report(iterations: int) -> None:
    cfg = ModelConfig(input=InputConfig(min_size=600, max_size=1000), sampling=RoiSamplingConfig(rois_per_image=128))
    cfg67 = dataclasses.replace(cfg, conv67=True, pool_from=("conv3", "conv4", "conv5", "conv7", "context"))
    samples = synthetic_samples(count=8, height=600, width=1000, num_proposals=2000)
    gpu = torch.device("cuda")
    print(f"CUDA {torch.cuda.get_device_name(0)}: full VGG16 ION, 600x1000, 2000 proposals, 128 sampled, "
          f"4 images/update, 1 worker, {iterations} updates")
    for name, model_cfg in (("ION (conv3-5 + IRNN)", cfg), ("ION + conv6/7 (Appendix)", cfg67)):
        rates = {amp: loop_images_per_s(model_cfg, samples, iterations=iterations, amp=amp, device=gpu)
                 for amp in ("off", "bf16", "fp16")}
        print(f"  {name:26s} fp32 {rates['off']:6.2f} img/s   bf16 {rates['bf16']:6.2f} img/s "
              f"({rates['bf16'] / rates['off']:.2f}x)   fp16 {rates['fp16']:6.2f} img/s "
              f"({rates['fp16'] / rates['off']:.2f}x)")
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5, help="timed updates per measurement (after 1 warm-up)")
    parser.add_argument("--skip-cpu", action="store_true", help="only the CUDA measurements")
    args = parser.parse_args()
    if not args.skip_cpu:
        cpu_report(args.iterations)
    if torch.cuda.is_available():
        cuda_report(args.iterations)
    else:
        print("CUDA: not available here (run on a GPU machine for the full-size numbers)")


if __name__ == "__main__":
    main()
