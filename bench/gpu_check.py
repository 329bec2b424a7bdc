"""The training engine on a GPU, checked in one command: the smoke model's
losses on CUDA against the CPU, bf16 against fp32, run-to-run equality, and a
run killed (SIGKILL) and resumed from its checkpoint against an uninterrupted one.

    python -m bench.gpu_check            # CUDA against the CPU (the GPU's name is printed)
    python -m bench.gpu_check --tiny     # every run on the CPU: the same code, what the tests run

Imports only torch, torchvision, numpy and ion/ (no Ray, MLflow, YAML): the model
is configs/smoke.yaml's, built here from ion's dataclasses (tests/bench/
test_gpu_check.py checks that it is the one the config loads), trained with
smoke's schedule (3 + 2 updates of 2 images) on synthetic 224x288 images with
masks (bench/gpu.py; 112x144 with --tiny). docs/GPU.md says what each line means and what to expect.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.gpu import Size, synthetic_samples
from ion.engine.checkpoint import load_checkpoint, write_checkpoint
from ion.engine.loop import train
from ion.engine.schedule import Phase
from ion.modeling.build import build_detector
from ion.modeling.config import ContextConfig, InputConfig, ModelConfig, RoiSamplingConfig

NUM_CLASSES = 80
IMAGES = 8
IMAGES_PER_BATCH = 2
CHECKPOINT_EVERY = 2
KILL_AFTER = 3  # the child kills itself after update 3: its last checkpoint is update 2's
PHASES = (Phase(name="first", iterations=3, frozen=("conv1",), lr_start=0.01, lr_end=0.005),
          Phase(name="second", iterations=2, lr_start=0.001, lr_end=0.0005, momentum=0.99))


def smoke_model() -> ModelConfig:
    """configs/smoke.yaml's model section (configs/default.yaml's with smoke's overrides)."""
    return ModelConfig(width=0.25, block_convs=(1, 1, 1, 1, 1), roi_op="roi_align", fuse=True, norm="channel",
                       reduce_channels=32, fc_dim=64,
                       context=ContextConfig(kind="irnn", hidden=128, recurrent="identity", state_norm="steps",
                                             input_init="identity", pool_from_both=True,
                                             pool_directions="separate"),
                       seg_loss_weight=1.0, input=InputConfig(min_size=224, max_size=288),
                       sampling=RoiSamplingConfig(rois_per_image=16))


def _size(tiny: bool) -> Size:
    """smoke's 224x288 images; --tiny: 112x144 (a quarter of the pixels, the same code)."""
    height, width = (112, 144) if tiny else (224, 288)
    return Size(model=smoke_model(), height=height, width=width, proposals=100, train_iterations=0,
                inference_images=0, hidden=128, repeats=0)


def run_training(device: torch.device, *, tiny: bool, amp: str = "off", checkpoints: Path | None = None,
                 resume: dict | None = None, kill_after: int | None = None) -> dict[str, Any]:
    """Train the smoke model; {"losses": per-update totals, "state": final weights (CPU), "seconds"}.
    With `checkpoints`, last.pt is written there every CHECKPOINT_EVERY updates; with
    `kill_after`, the process SIGKILLs itself after that update (before its checkpoint)."""
    samples = synthetic_samples(_size(tiny), IMAGES)
    torch.manual_seed(0)
    model = build_detector(smoke_model(), num_classes=NUM_CLASSES)

    def save(state: dict, event) -> str:
        if checkpoints is None:
            return "not kept"
        return str(write_checkpoint(state, checkpoints / "last.pt"))

    def on_iteration(done: int) -> None:
        if kill_after is not None and done == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    started = time.perf_counter()
    result = train(model=model, phases=PHASES, num_images=len(samples),
                   get_sample=lambda index, phase_index, rng: samples[index], seed=0, save_checkpoint=save,
                   on_iteration=on_iteration,
                   resume=resume, images_per_batch=IMAGES_PER_BATCH, checkpoint_every=CHECKPOINT_EVERY, log_every=1,
                   amp=amp, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"losses": [r["loss"] for r in result.history], "state": state,
            "seconds": time.perf_counter() - started}


def max_relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def weight_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[bool, float]:
    """(bitwise equal, max |a - b| over every float tensor)."""
    equal = all(torch.equal(a[k], b[k]) for k in b)
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in b if b[k].is_floating_point())
    return equal, diff


def killed_and_resumed(device: torch.device, directory: Path, *, tiny: bool) -> dict[str, Any]:
    """A child process trains on `device` and is killed after update KILL_AFTER; a
    fresh one resumes from its checkpoint and finishes. Their final weights."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    base = [sys.executable, "-m", "bench.gpu_check", "--child", str(directory), "--device", str(device)]
    base += ["--tiny"] if tiny else []
    killed = subprocess.run(base + ["--kill-after", str(KILL_AFTER)], env=env, capture_output=True, text=True)
    if killed.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the child to kill ended with {killed.returncode}: {killed.stderr[-2000:]}")
    resumed_from = int(load_checkpoint(directory / "last.pt")["iteration"])
    resumed = subprocess.run(base + ["--resume"], env=env, capture_output=True, text=True)
    if resumed.returncode != 0:
        raise RuntimeError(f"the resumed run failed: {resumed.stderr[-2000:]}")
    return {"resumed_from": resumed_from, "state": torch.load(directory / "final.pt", weights_only=True)}


def _child(directory: Path, device: torch.device, *, tiny: bool, kill_after: int | None, resume: bool) -> None:
    checkpoint = load_checkpoint(directory / "last.pt") if resume else None
    result = run_training(device, tiny=tiny, checkpoints=directory, resume=checkpoint, kill_after=kill_after)
    torch.save(result["state"], directory / "final.pt")


def _seconds(run: dict) -> str:
    return f"{run['seconds']:.1f} s"


def checks(device: torch.device, *, tiny: bool = False) -> list[tuple[str, str]]:
    """(check, result) lines; docs/GPU.md says what to expect of each. On the CPU
    (--tiny) the CPU reference is also the device's run, and the run-to-run and
    bf16 lines are left out (the resumed run is compared with the reference)."""
    cpu = run_training(torch.device("cpu"), tiny=tiny)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 against the CPU's fp32
    torch.backends.cudnn.allow_tf32 = False
    first = run_training(device, tiny=tiny) if device.type == "cuda" else cpu
    lines = [("losses, CPU fp32", " ".join(f"{v:.6f}" for v in cpu["losses"]) + f"  ({_seconds(cpu)})"),
             (f"losses, {device} fp32", " ".join(f"{v:.6f}" for v in first["losses"]) + f"  ({_seconds(first)})"),
             (f"{device} fp32 vs CPU fp32: max relative loss difference",
              f"{max_relative(first['losses'], cpu['losses']):.2e}"),
             (f"{device} fp32 vs CPU fp32: max |weight difference|",
              f"{weight_difference(first['state'], cpu['state'])[1]:.2e}")]
    if device.type == "cuda":  # on the CPU, the resumed run below compares two runs too
        second = run_training(device, tiny=tiny)
        equal, diff = weight_difference(second["state"], first["state"])
        lines.append(("cuda run to run: weights bitwise equal", f"{equal} (max |difference| {diff:.2e})"))
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        det_a, det_b = run_training(device, tiny=tiny), run_training(device, tiny=tiny)
        torch.backends.cudnn.deterministic = False
        equal, diff = weight_difference(det_b["state"], det_a["state"])
        lines.append(("cuda run to run with cudnn.deterministic: weights bitwise equal",
                      f"{equal} (max |difference| {diff:.2e}; {_seconds(det_a)} against {_seconds(second)})"))
        # bf16 on the GPU only: CPU bf16 autocast is tested in tests/ion/ (and is slow).
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        bf16 = run_training(device, tiny=tiny, amp="bf16")
        lines.append(("cuda bf16 autocast vs fp32: max relative loss difference",
                      f"{max_relative(bf16['losses'], first['losses']):.2e} ({_seconds(bf16)})"))
    with tempfile.TemporaryDirectory(prefix="ion-gpu-check-") as tmp:
        resumed = killed_and_resumed(device, Path(tmp), tiny=tiny)
    # `first` ran with the child processes' flags (TF32 off).
    equal, diff = weight_difference(resumed["state"], first["state"])
    lines.append((f"{device} killed after update {KILL_AFTER}, resumed from update {resumed['resumed_from']}: "
                  f"weights bitwise equal to an uninterrupted run", f"{equal} (max |difference| {diff:.2e})"))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="every run on the CPU (the tests' mode)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kill-after", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        _child(args.child, torch.device(args.device), tiny=args.tiny, kill_after=args.kill_after,
               resume=args.resume)
        return
    if args.tiny:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        sys.exit("bench.gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
                 "run it on a GPU machine, or with --tiny for the CPU-only check")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"bench.gpu_check: the smoke model's training on {name} ({device}) against the CPU, "
          f"torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    for check, result in checks(device, tiny=args.tiny):
        print(f"{check}: {result}", flush=True)
    print(f"bench.gpu_check: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
