"""The ION training loop: phases of SGD with momentum kept across them (Sec. 4.1, Appendix).

Pure PyTorch. The stage (stages/train.py) hands in the model, the phases, a
function that builds one training sample, and callbacks that write
checkpoints and log metrics; Ray Train plugs in through those callbacks and
`rank`/`world_size` (torch.distributed must then be initialised).

One iteration = one minibatch update (Sec. 4.1):
  - `images_per_batch` single-image forward/backward passes; with W workers each
    takes images_per_batch / W of them, so 4 workers need no accumulation;
  - the gradients are summed over the minibatch's images (accumulation, then an
    all-reduce across workers in buckets that start during the backward of each
    worker's last image: ion/engine/grad_sync.py), clipped at `clip_grad_norm` (80 over 4 images:
    20 per image), then divided by `images_per_batch`: Caffe's order
    (ClipGradients on the summed diff, then Normalize by iter_size);
  - one torch.optim.SGD step; trainable parameters that got no gradient get a
    zero one, so all of them decay and keep their momentum every update,
    whatever the image (as in Caffe), and N workers match one.

Determinism: the image order is an epoch-wise permutation drawn from the seed;
image position c (the data cursor, c = iteration * images_per_batch + j) gets
its own numpy Generator for the sample (flip) and its own torch seed for the
model's randomness (ROI sampling, dropout), both derived from (seed, c). So the
images and their randomness per update do not depend on the number of workers
or on where a run was interrupted. Checkpoints are written only between
updates; a run killed inside an accumulation redoes that update from its first
image. On CPU a resumed run ends bitwise equal to an uninterrupted one.

The momentum semantics ("caffe" or "pytorch") are explained in ion/engine/optim.py.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ion.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointEvent,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from ion.engine.grad_sync import OverlappedAllReduce
from ion.engine.optim import build_optimizer, set_dropout, set_frozen, set_hyperparameters
from ion.engine.schedule import ImageOrder, PhaseSpec, model_seed, phase_lr, sample_rng, seed_model_rng, step_positions
from ion.errors import Interrupted, UserError

AUTOCAST_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainSample:
    """One image ready for the model (ion/data/train_samples.py builds it).

    image: Tensor[1, 3, H, W] float32, resized and normalised
    proposals: Tensor[P, 4] float32 xyxy in resized-image coordinates
    targets: tensors for the model's losses (boxes, labels, crowd flags, masks)
    """

    image: Tensor
    proposals: Tensor
    targets: dict[str, Any]



@dataclass(frozen=True)
class TrainResult:
    iterations: int  # updates done in total (all phases, earlier sessions included)
    start_iteration: int  # where this session started: 0, or the resumed checkpoint's iteration
    history: list[dict[str, float]]  # the logged records, earlier sessions included
    seconds: float  # wall time of this session
    images_per_s: float  # images per second of this session, all workers together


class NonFiniteLossError(RuntimeError):
    """A loss or the gradient norm was NaN or infinite: training stopped before
    the update, so no checkpoint holds the bad state."""



@dataclass
class _Position:
    """Where the run stands: the next update to do. A finished phase is
    normalised to (next phase, 0); phase_index == len(phases) means done."""

    phase_index: int = 0
    phase_iteration: int = 0
    iteration: int = 0

    def advance(self, phases: Sequence[PhaseSpec]) -> None:
        self.iteration += 1
        self.phase_iteration += 1
        if self.phase_iteration == phases[self.phase_index].iterations:
            self.phase_index += 1
            self.phase_iteration = 0


@dataclass
class _Window:
    """Sums over the updates since the last log record (saved in checkpoints so
    a resumed run logs the same values)."""

    loss_sums: dict[str, float] = field(default_factory=dict)
    images: int = 0
    updates: int = 0
    grad_norm_sum: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def state(self) -> dict[str, Any]:
        return {"loss_sums": dict(self.loss_sums), "images": self.images, "updates": self.updates,
                "grad_norm_sum": self.grad_norm_sum}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "_Window":
        return cls(loss_sums=dict(state["loss_sums"]), images=state["images"], updates=state["updates"],
                   grad_norm_sum=state["grad_norm_sum"])

    def record(self, *, iteration: int, phase_index: int, lr: float) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        rec = {"iteration": float(iteration), "phase": float(phase_index), "lr": lr,
               "grad_norm": self.grad_norm_sum / max(self.updates, 1), "images_per_s": self.images / seconds}
        for key, total in self.loss_sums.items():
            rec[key] = total / max(self.images, 1)
        return rec


class _SampleFeed:
    """Training samples by data cursor position, loaded ahead in threads.

    Each sample is a pure function of (image index, phase, position): its
    randomness comes from `sample_rng(seed, position)`, so loading order and
    threads change nothing."""

    def __init__(self, get_sample: Callable[[int, int, np.random.Generator], TrainSample], *, seed: int,
                 order: ImageOrder, threads: int) -> None:
        self._get_sample = get_sample
        self._seed = seed
        self._order = order
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="train-data") if threads > 0 else None
        self._pending: dict[int, Future] = {}

    def _load(self, index: int, phase_index: int, position: int) -> TrainSample:
        return self._get_sample(index, phase_index, sample_rng(seed=self._seed, position=position))

    def request(self, position: int, phase_index: int) -> None:
        if self._pool is not None and position not in self._pending:
            index = self._order.index(position)  # here, not in a thread: the order cache is not shared
            self._pending[position] = self._pool.submit(self._load, index, phase_index, position)

    def take(self, position: int, phase_index: int) -> TrainSample:
        future = self._pending.pop(position, None)
        if future is not None:
            return future.result()
        return self._load(self._order.index(position), phase_index, position)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def train(*, model: nn.Module, phases: Sequence[PhaseSpec], num_images: int,
          get_sample: Callable[[int, int, np.random.Generator], TrainSample], seed: int,
          save_checkpoint: Callable[[dict[str, Any], CheckpointEvent], str],
          log_metrics: Optional[Callable[[int, dict[str, float]], None]] = None,
          on_iteration: Optional[Callable[[int], None]] = None,
          should_stop: Optional[Callable[[], bool]] = None,
          resume: Optional[dict[str, Any]] = None,
          images_per_batch: int = 4, clip_grad_norm: Optional[float] = 80.0,
          momentum_semantics: str = "caffe", checkpoint_every: int = 100, log_every: int = 10,
          amp: str = "off", device: torch.device | str = "cpu", loader_threads: int = 0,
          rank: int = 0, world_size: int = 1) -> TrainResult:
    """Run `phases` in order on `model` (train mode: model(image, proposals,
    targets) -> dict of loss terms; the total is their sum).

    get_sample(image_index, phase_index, rng) -> TrainSample builds one image's
    input (rng: that image's Generator). save_checkpoint(state, event) -> str
    stores a checkpoint state (every `checkpoint_every` updates and at each
    phase end) and says where; log_metrics(iteration, record) gets the averages
    over the last `log_every` updates (loss, loss_<term>, lr, grad_norm,
    images_per_s, phase) and at each phase end; on_iteration(iteration) after
    every update. should_stop() is asked after every update: True (a SIGTERM)
    writes a checkpoint there and raises Interrupted, so a rerun resumes at that
    update (with several workers, any worker's True stops every one after that
    same update). `resume`: a checkpoint state to continue from exactly.
    With world_size > 1, torch.distributed must be initialised; every worker
    calls this with the same arguments but its rank, and every worker calls the
    callbacks (a Ray Train report is a barrier); only rank 0 need store.
    """
    assert momentum_semantics in ("caffe", "pytorch") and amp in AUTOCAST_DTYPES
    assert images_per_batch % world_size == 0, "images_per_batch must be divisible by the number of workers"
    assert world_size == 1 or dist.is_initialized(), "several workers need torch.distributed"
    device = torch.device(device)
    model.to(device)
    model.train()
    optimizer = build_optimizer(model, lr=phase_lr(phases[0], 0), momentum=phases[0].momentum,
                                weight_decay=phases[0].weight_decay)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    autocast_dtype = AUTOCAST_DTYPES[amp]
    pos, history, window = _Position(), [], _Window()
    last_saved = "none (the run would restart from its first iteration)"
    if resume is not None:
        _check_resumable(resume, phases=phases, seed=seed, num_images=num_images,
                         images_per_batch=images_per_batch)
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        restore_rng_state(resume["rng"])
        pos = _Position(resume["phase_index"], resume["phase_iteration"], resume["iteration"])
        history, window = list(resume["history"]), _Window.from_state(resume["log_window"])
        last_saved = f"the checkpoint this run resumed from (iteration {pos.iteration})"
    if world_size > 1:
        _broadcast_from_rank0(model)
    order = ImageOrder(seed=seed, num_images=num_images)
    feed = _SampleFeed(get_sample, seed=seed, order=order, threads=loader_threads)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    overlap = OverlappedAllReduce(params) if world_size > 1 else None
    started, start_iteration = time.perf_counter(), pos.iteration
    try:
        while pos.phase_index < len(phases):
            p = pos.phase_index
            phase = phases[p]
            enter_phase(model, optimizer, phase, starting=pos.phase_iteration == 0)
            if overlap is not None:
                overlap.set_trainable()  # this phase's frozen set
            while pos.phase_index == p:
                lr = phase_lr(phase, pos.phase_iteration)
                set_hyperparameters(optimizer, lr=lr, momentum=phase.momentum, weight_decay=phase.weight_decay,
                                    caffe_momentum=momentum_semantics == "caffe")
                positions = step_positions(iteration=pos.iteration, images_per_batch=images_per_batch,
                                           rank=rank, world_size=world_size)
                _prefetch(feed, positions=positions, images_per_batch=images_per_batch, phases=phases, pos=pos)
                where = f"iteration {pos.iteration} (phase {p} '{phase.name}', its iteration {pos.phase_iteration}"
                optimizer.zero_grad(set_to_none=True)
                losses, failure = {}, None
                for k, position in enumerate(positions):
                    sample = feed.take(position, p)
                    seed_model_rng(model_seed(seed=seed, position=position), device)
                    total, terms = _forward(model, sample, device=device, autocast_dtype=autocast_dtype)
                    if not all(math.isfinite(v) for v in terms.values()):
                        failure = (f"non-finite loss at {where}; image {order.index(position)}, data position "
                                   f"{position}): {_format_terms(terms)}; stopped before the update; last good "
                                   f"checkpoint: {last_saved}")
                        break
                    if overlap is not None and k == len(positions) - 1:
                        # Every worker agrees to go on before the gradient exchange starts
                        # inside this backward (grad_sync.py), so none is left waiting in it.
                        _stop_if_any_worker_failed(None, rank=rank, world_size=world_size, device=device)
                        overlap.arm()
                    if total.requires_grad:  # accumulate: the gradient of the sum over the images
                        (scaler.scale(total) if scaler is not None else total).backward()
                    losses = {k: losses.get(k, 0.0) + v for k, v in terms.items()}
                if overlap is None or failure is not None:
                    _stop_if_any_worker_failed(failure, rank=rank, world_size=world_size, device=device)
                grad_norm = _update(optimizer, scaler, params, images_per_batch=images_per_batch,
                                    clip_grad_norm=clip_grad_norm, overlap=overlap)
                if not math.isfinite(grad_norm) and scaler is None:
                    raise NonFiniteLossError(
                        f"non-finite gradient norm ({grad_norm}) at {where}); losses summed over this worker's "
                        f"images: {_format_terms(losses)}; stopped before the update; last good checkpoint: "
                        f"{last_saved}")
                pos.advance(phases)
                if on_iteration is not None:
                    on_iteration(pos.iteration)
                # Asked here so that the workers' answers travel with the loss sums:
                # every worker stops after the same update, none waits in a collective.
                stopping = should_stop is not None and should_stop()
                losses, stopping = _sum_across_workers(losses, world_size, stopping)
                _accumulate(window, losses, grad_norm=grad_norm, images=images_per_batch)
                phase_end = pos.phase_index != p
                if pos.iteration % log_every == 0 or phase_end:
                    record = window.record(iteration=pos.iteration, phase_index=p, lr=lr)
                    history.append(record)
                    window = _Window()
                    if log_metrics is not None:
                        log_metrics(pos.iteration, record)
                if pos.iteration % checkpoint_every == 0 or phase_end or stopping:
                    state = _checkpoint_state(model=model, optimizer=optimizer, scaler=scaler, pos=pos,
                                              phases=phases, seed=seed, num_images=num_images,
                                              images_per_batch=images_per_batch, history=history, window=window)
                    event = CheckpointEvent(iteration=pos.iteration, phase_index=p, phase_name=phase.name,
                                            phase_end=phase_end)
                    last_saved = f"{save_checkpoint(state, event)} (iteration {pos.iteration})"
                if stopping:
                    raise Interrupted(f"training stopped after iteration {pos.iteration}; checkpoint: {last_saved}")
    finally:
        feed.close()
        if overlap is not None:
            overlap.remove()
    seconds = time.perf_counter() - started
    images = (pos.iteration - start_iteration) * images_per_batch
    return TrainResult(iterations=pos.iteration, start_iteration=start_iteration, history=history, seconds=seconds,
                       images_per_s=images / max(seconds, 1e-9))


def enter_phase(model: nn.Module, optimizer: torch.optim.Optimizer, phase: PhaseSpec, *, starting: bool) -> None:
    """Apply a phase's frozen set and dropout; when the phase is starting (not
    resumed in its middle), also its start-up: weights (and optimizer state)
    from another run, and the momentum reset switch."""
    if starting and phase.init_from is not None:
        init = load_checkpoint(Path(phase.init_from))
        try:
            model.load_state_dict(init["model"])
        except (KeyError, RuntimeError) as err:
            raise UserError(f"{phase.init_from}: its weights do not fit this model ({err}); "
                            f"phase '{phase.name}' init_from must come from a run with the same model config")
        if phase.init_optimizer:
            if "optimizer" not in init:
                raise UserError(f"{phase.init_from}: holds weights only, no optimizer state; phase '{phase.name}': "
                                "set init_optimizer: false or point init_from at a checkpoints/*.pt file")
            optimizer.load_state_dict(init["optimizer"])
        else:
            optimizer.state.clear()
    if starting and phase.reset_momentum:
        optimizer.state.clear()
    set_frozen(model, tuple(phase.frozen))
    set_dropout(model, phase.dropout)


def _prefetch(feed: _SampleFeed, *, positions: range, images_per_batch: int, phases: Sequence[PhaseSpec],
              pos: _Position) -> None:
    """Ask for this update's images and this worker's images of the next update
    (in the next phase when this update ends one)."""
    for position in positions:
        feed.request(position, pos.phase_index)
    next_phase = pos.phase_index + (pos.phase_iteration + 1 == phases[pos.phase_index].iterations)
    if next_phase < len(phases):
        for position in positions:
            feed.request(position + images_per_batch, next_phase)


def _forward(model: nn.Module, sample: TrainSample, *, device: torch.device,
             autocast_dtype: Optional[torch.dtype]) -> tuple[Tensor, dict[str, float]]:
    """One image's loss terms; returns (total loss tensor, {"loss": total, "loss_<term>": value})."""
    image = sample.image.to(device, non_blocking=True)
    proposals = sample.proposals.to(device, non_blocking=True)
    targets = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in sample.targets.items()}
    with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        terms = model(image, proposals, targets)
    terms = {k: v.float() if isinstance(v, Tensor) else torch.tensor(float(v), device=device)
             for k, v in terms.items()}
    total = torch.stack(list(terms.values())).sum()
    values = torch.stack([total.detach()] + [v.detach() for v in terms.values()]).tolist()
    names = ["loss"] + [f"loss_{k}" for k in terms]
    return total, dict(zip(names, values))


def _update(optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler], params: Sequence[Tensor], *,
            images_per_batch: int, clip_grad_norm: Optional[float],
            overlap: Optional[OverlappedAllReduce]) -> float:
    """Sum across workers (the buckets `overlap` sent during the last backward,
    and the rest), clip the summed gradient, average, step. Returns the L2 norm
    of the gradient summed over the minibatch's images, before clipping."""
    trainable = [p for p in params if p.requires_grad]
    for p in trainable:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if overlap is not None:
        overlap.finish()
    grads = [p.grad for p in trainable]
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    norm_value = float(norm)
    if math.isfinite(norm_value):
        if clip_grad_norm is not None:
            # Sec. 4.1: rescale when the L2 norm exceeds 80 over the 4-image sum.
            torch.nn.utils.clip_grads_with_norm_(trainable, clip_grad_norm, norm)
        # Caffe's iter_size normalisation: the update uses the minibatch mean.
        for g in grads:
            g.div_(images_per_batch)
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    elif scaler is not None:
        scaler.step(optimizer)  # skipped by the scaler: it saw the inf; it lowers the scale
    if scaler is not None:
        scaler.update()
    return norm_value


def _stop_if_any_worker_failed(failure: Optional[str], *, rank: int, world_size: int, device: torch.device) -> None:
    """Raise NonFiniteLossError on every worker when one of them saw a
    non-finite loss, with that worker's message: all stop together, none is
    left waiting in the gradient all-reduce."""
    if world_size == 1:
        if failure is not None:
            raise NonFiniteLossError(failure)
        return
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    first = torch.tensor([rank if failure is not None else world_size], device=on)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    src = int(first.item())
    if src < world_size:
        message = [failure]
        dist.broadcast_object_list(message, src=src, device=on)
        raise NonFiniteLossError(f"{message[0]} (on worker {src})")


def _sum_across_workers(losses: dict[str, float], world_size: int, stop: bool) -> tuple[dict[str, float], bool]:
    """Loss sums of this update over all workers' images (every worker gets
    them), and whether any worker was asked to stop (one all-reduce for both)."""
    if world_size == 1:
        return losses, stop
    keys = sorted(losses)
    sums = torch.tensor([losses[k] for k in keys] + [1.0 if stop else 0.0], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        sums = sums.cuda()
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    values = sums.cpu().tolist()
    return dict(zip(keys, values[:-1])), values[-1] > 0


def _accumulate(window: _Window, losses: dict[str, float], *, grad_norm: float, images: int) -> None:
    for key, value in losses.items():
        window.loss_sums[key] = window.loss_sums.get(key, 0.0) + value
    window.images += images
    window.updates += 1
    window.grad_norm_sum += grad_norm


def _broadcast_from_rank0(model: nn.Module) -> None:
    """Start every worker from rank 0's weights and buffers (as DDP does)."""
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)


def _format_terms(terms: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.6g}" for k, v in terms.items())


def _phase_summary(phase: PhaseSpec) -> dict[str, Any]:
    return {"name": phase.name, "iterations": int(phase.iterations)}


def _checkpoint_state(*, model: nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: Optional[torch.amp.GradScaler], pos: _Position, phases: Sequence[PhaseSpec],
                      seed: int, num_images: int, images_per_batch: int, history: list[dict[str, float]],
                      window: _Window) -> dict[str, Any]:
    """Everything an exact resume needs (module docstring): weights, momentum,
    schedule position, RNG states, data cursor, the log so far."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "phase_index": pos.phase_index,
        "phase_iteration": pos.phase_iteration,
        "iteration": pos.iteration,
        "cursor": pos.iteration * images_per_batch,
        "seed": seed,
        "num_images": num_images,
        "images_per_batch": images_per_batch,
        "phases": [_phase_summary(ph) for ph in phases],
        "rng": capture_rng_state(),
        "history": list(history),
        "log_window": window.state(),
    }


def _check_resumable(state: dict[str, Any], *, phases: Sequence[PhaseSpec], seed: int, num_images: int,
                     images_per_batch: int) -> None:
    """A checkpoint continues only the run that wrote it: same phases, seed, data."""
    expected = {"format": CHECKPOINT_FORMAT, "seed": seed, "num_images": num_images,
                "images_per_batch": images_per_batch, "phases": [_phase_summary(ph) for ph in phases]}
    found = {k: state.get(k) for k in expected}
    if found != expected:
        diff = {k: (found[k], expected[k]) for k in expected if found[k] != expected[k]}
        raise UserError(f"the checkpoint to resume from belongs to another run (checkpoint vs this run: {diff}); "
                        "delete it or restore the config it was written with")
    if state["cursor"] != state["iteration"] * images_per_batch:
        raise UserError(f"the checkpoint to resume from is inconsistent (cursor {state['cursor']}, iteration "
                        f"{state['iteration']}); delete it to restart the stage")
