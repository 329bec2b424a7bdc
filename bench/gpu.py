"""What the paper-size ION does per second on this machine's accelerator: one run, one table.

    python -m bench.gpu            # on a GPU machine (CPU if there is none: slow)
    python -m bench.gpu --tiny     # the same code on a small model, on the CPU, in under a minute

Measured side by side on whatever device it finds (CUDA if present; the title
names it):
  - training images/s of ion.engine.loop.train: the model configs/coco_base.yaml
    trains (VGG16 width 1.0 with conv6/conv7, skip pooling from conv3/4/5/7 +
    context, four-direction IRNN with 512 hidden units and learned Whh, and the
    segmentation loss on the top context map, weight 1), 600x1000 images with
    instance masks, 2000 proposals, 128 sampled ROIs per image, 4 images per
    update, bf16 autocast on a GPU (fp32 on the CPU);
  - inference images/s of ion.inference.predict.predict_raw: one pass, and
    with the left-right flip and two box-regression rounds (bf16 on a GPU),
    keeping candidates at the detect stage's score threshold (SCORE_THRESH =
    detect.score_thresh's default). A random model's class scores are flat (all
    ~1/81, below the threshold), so the class logits are scaled (bisection) for
    the candidate count a trained model keeps (TARGET_CANDIDATES), and the
    count is printed with the figures;
  - the IRNN's recurrence (forward + backward at conv5 of a 600x1000 image):
    the closed-form scan against the step loop (Whh = I);
  - ROI pooling of 2000 ROIs from conv5 (forward + backward): roi_pool against roi_align.
Every measurement follows warm-up runs; images are synthetic.

Imports only torch, torchvision, numpy and ion/ (no Ray, MLflow, Optuna,
pycocotools, OpenCV): the model config is built here from ion's dataclasses.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ion.engine.loop import TrainSample, train
from ion.engine.schedule import Phase
from ion.inference.predict import SCORE_THRESH, predict_raw
from ion.modeling.build import build_detector
from ion.modeling.config import ContextConfig, InputConfig, ModelConfig, RoiSamplingConfig
from ion.modeling.irnn import four_direction_scan
from ion.modeling.skip_pool import roi_pool_map

NUM_CLASSES = 80  # COCO
NUM_GT = 8
IMAGES_PER_BATCH = 4
SEG_LOSS_WEIGHT = 1.0  # configs/coco_base.yaml: Table 3 "S"
# Candidates per image a trained detector keeps at SCORE_THRESH (docs/SCALE.md: ~1000;
# docs/RESULTS.md: ~380 on the small smoke run).
TARGET_CANDIDATES = 1000


@dataclass(frozen=True)
class Size:
    """One benchmark size: the model and the work per image."""

    model: ModelConfig
    height: int
    width: int
    proposals: int
    train_iterations: int
    inference_images: int
    hidden: int
    repeats: int
    candidates: int = TARGET_CANDIDATES  # kept per image at SCORE_THRESH


def paper_size() -> Size:
    """configs/coco_base.yaml's model section (coco_ion.yaml's)."""
    model = ModelConfig(width=1.0, conv67=True, pool_from=("conv3", "conv4", "conv5", "conv7", "context"),
                        roi_op="roi_pool", norm="blob", scale_mode="learned", dropout=0.0,
                        context=ContextConfig(kind="irnn", hidden=512, recurrent="learned"),
                        seg_loss_weight=SEG_LOSS_WEIGHT,
                        input=InputConfig(min_size=600, max_size=1000),
                        sampling=RoiSamplingConfig(rois_per_image=128))
    return Size(model=model, height=600, width=1000, proposals=2000, train_iterations=6, inference_images=6,
                hidden=512, repeats=5)


def tiny_size() -> Size:
    """The same code at CPU scale."""
    model = ModelConfig(width=0.125, batchnorm=True, conv67=True,
                        pool_from=("conv3", "conv4", "conv5", "conv7", "context"), roi_op="roi_pool",
                        fc_dim=64, context=ContextConfig(kind="irnn", hidden=32, recurrent="learned"),
                        seg_loss_weight=SEG_LOSS_WEIGHT,
                        input=InputConfig(min_size=128, max_size=200), sampling=RoiSamplingConfig(rois_per_image=32))
    return Size(model=model, height=128, width=200, proposals=200, train_iterations=2, inference_images=2,
                hidden=32, repeats=2, candidates=100)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_boxes(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    xy = rng.uniform(0, [width - 16, height - 16], size=(n, 2))
    wh = rng.uniform(8, [width / 3, height / 3], size=(n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, [width, height])], 1).astype(np.float32)


def synthetic_samples(size: Size, count: int) -> list[TrainSample]:
    """Random images, ground truth with box-shaped instance masks (the segmentation
    loss's targets) and proposals (half of them near the ground truth)."""
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(count):
        gt = torch.from_numpy(_random_boxes(rng, NUM_GT, size.height, size.width))
        near = gt[torch.from_numpy(rng.integers(0, NUM_GT, size.proposals // 2))]
        near = (near + torch.from_numpy(rng.normal(0, 4, size=near.shape).astype(np.float32))).clamp(min=0)
        rest = torch.from_numpy(_random_boxes(rng, size.proposals - size.proposals // 2, size.height, size.width))
        image = torch.from_numpy(rng.standard_normal((1, 3, size.height, size.width)).astype(np.float32))
        masks = torch.zeros(NUM_GT, size.height, size.width, dtype=torch.bool)
        for mask, (x1, y1, x2, y2) in zip(masks, gt.round().long().tolist()):
            mask[y1:y2, x1:x2] = True
        targets = {"boxes": gt, "labels": torch.from_numpy(rng.integers(1, NUM_CLASSES + 1, NUM_GT)),
                   "iscrowd": torch.zeros(NUM_GT, dtype=torch.bool), "masks": masks}
        samples.append(TrainSample(image=image, proposals=torch.cat([near, rest]), targets=targets))
    return samples


def train_images_per_s(size: Size, device: torch.device, amp: str, warmup: int = 2) -> float:
    """images/s of the training engine after `warmup` updates."""
    samples = synthetic_samples(size, 8)
    torch.manual_seed(0)
    model = build_detector(size.model, num_classes=NUM_CLASSES)
    phase = Phase(name="bench", iterations=warmup + size.train_iterations, lr_start=1e-4, lr_end=1e-4)
    stamps: dict[int, float] = {}

    def on_iteration(done: int) -> None:
        if done in (warmup, warmup + size.train_iterations):
            _sync(device)
            stamps[done] = time.perf_counter()

    train(model=model, phases=(phase,), num_images=len(samples),
          get_sample=lambda index, phase_index, rng: samples[index], seed=0,
          save_checkpoint=lambda state, event: "not kept", on_iteration=on_iteration,
          images_per_batch=IMAGES_PER_BATCH, checkpoint_every=10**9, log_every=10**9, amp=amp, device=device)
    seconds = stamps[warmup + size.train_iterations] - stamps[warmup]
    return size.train_iterations * IMAGES_PER_BATCH / seconds


def inference_model(size: Size, device: torch.device, amp: str) -> tuple[torch.nn.Module, np.ndarray, np.ndarray, int]:
    """(model, image, proposals, candidates kept per pass): a random detector whose
    class logits are scaled so that one pass keeps about `size.candidates` candidates
    at SCORE_THRESH (module docstring)."""
    torch.manual_seed(0)
    model = build_detector(size.model, num_classes=NUM_CLASSES).to(device).eval()
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (size.height, size.width, 3), dtype=np.uint8)
    proposals = _random_boxes(rng, size.proposals, size.height, size.width)
    classifier = model.heads.cls_score
    weight, bias = classifier.weight.detach().clone(), classifier.bias.detach().clone()

    def kept(log2_scale: float) -> int:
        with torch.no_grad():  # sharper logits: more (ROI, class) pairs clear the threshold
            classifier.weight.copy_(weight * 2.0 ** log2_scale)
            classifier.bias.copy_(bias * 2.0 ** log2_scale)
        raw = predict_raw(model, image, proposals, min_size=size.model.input.min_size,
                          max_size=size.model.input.max_size, flip=False, two_rounds=False,
                          score_thresh=SCORE_THRESH, amp=amp)
        return len(raw["plain"]["scores"])

    low, high = -4.0, 16.0
    for _ in range(10):
        middle = (low + high) / 2
        low, high = (middle, high) if kept(middle) < size.candidates else (low, middle)
    return model, image, proposals, kept(high)


def inference_images_per_s(size: Size, device: torch.device, amp: str, *, flip: bool, two_rounds: bool,
                           prepared: tuple | None = None) -> float:
    """images/s of predict_raw on images already at the model's input size, at SCORE_THRESH."""
    model, image, proposals, _ = prepared or inference_model(size, device, amp)

    def once() -> None:
        predict_raw(model, image, proposals, min_size=size.model.input.min_size,
                    max_size=size.model.input.max_size, flip=flip, two_rounds=two_rounds,
                    score_thresh=SCORE_THRESH, amp=amp)

    return size.inference_images / _timed(once, device, repeats=size.inference_images)


def _timed(fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int = 1) -> float:
    """Seconds for `repeats` calls of fn after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return time.perf_counter() - start


def irnn_ms(size: Size, device: torch.device, scan: str) -> float:
    """ms per forward + backward of the four-direction recurrence (Whh = I) at conv5's size."""
    torch.manual_seed(0)
    x = torch.randn(1, size.hidden, size.height // 16, size.width // 16, device=device, requires_grad=True)
    upstream = torch.randn(1, 4 * size.hidden, size.height // 16, size.width // 16, device=device)

    def once() -> None:
        four_direction_scan(x, identity_scan=scan).backward(upstream)

    return 1e3 * _timed(once, device, repeats=size.repeats) / size.repeats


def roi_op_ms(size: Size, device: torch.device, op: str) -> float:
    """ms per forward + backward of 7x7 pooling of the proposals from a conv5 map."""
    torch.manual_seed(0)
    channels = max(16, int(512 * size.model.width))
    feat = torch.randn(1, channels, size.height // 16, size.width // 16, device=device, requires_grad=True)
    boxes = torch.from_numpy(_random_boxes(np.random.default_rng(2), size.proposals, size.height,
                                           size.width)).to(device)

    def once() -> None:
        roi_pool_map(feat, boxes, op=op, output_size=7, stride=16).sum().backward()

    return 1e3 * _timed(once, device, repeats=size.repeats) / size.repeats


def measure(size: Size, device: torch.device) -> list[tuple[str, float, str]]:
    """(measure, value, unit) rows, in the order of the module docstring."""
    amp = "bf16" if device.type == "cuda" else "off"
    rows = [(f"training ({amp}, {IMAGES_PER_BATCH} images/update, seg loss {SEG_LOSS_WEIGHT:g})",
             train_images_per_s(size, device, amp), "images/s")]
    prepared = inference_model(size, device, amp)
    kept = f"score >= {SCORE_THRESH:g}: {prepared[3]} candidates/pass"
    rows.append((f"inference single pass ({amp}, {kept})",
                 inference_images_per_s(size, device, amp, flip=False, two_rounds=False, prepared=prepared),
                 "images/s"))
    rows.append((f"inference flip + 2 rounds ({amp}, {kept})",
                 inference_images_per_s(size, device, amp, flip=True, two_rounds=True, prepared=prepared),
                 "images/s"))
    for scan in ("closed_form", "loop"):
        rows.append((f"IRNN scan {scan} (fwd+bwd)", irnn_ms(size, device, scan), "ms"))
    for op in ("roi_pool", "roi_align"):
        rows.append((f"{op} {size.proposals} ROIs (fwd+bwd)", roi_op_ms(size, device, op), "ms"))
    return rows


def format_table(rows: list[tuple[str, float, str]], *, title: str) -> str:
    width = max(len(name) for name, _, _ in rows)
    lines = [title, f"{'measure':<{width}}  {'value':>10}  unit", "-" * (width + 18)]
    lines += [f"{name:<{width}}  {value:>10.2f}  {unit}" for name, value, unit in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small model on the CPU (under a minute)")
    args = parser.parse_args()
    if args.tiny:
        size, device = tiny_size(), torch.device("cpu")
    else:
        size = paper_size()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    started = time.perf_counter()
    rows = measure(size, device)
    title = (f"bench.gpu: {'tiny' if args.tiny else 'paper-size'} ION on {name} ({device}), "
             f"{size.height}x{size.width}, {size.proposals} proposals, torch {torch.__version__}, "
             f"{time.perf_counter() - started:.0f} s")
    print(format_table(rows, title=title), flush=True)


if __name__ == "__main__":
    main()
