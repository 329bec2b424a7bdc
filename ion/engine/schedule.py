"""The schedule and the data order of training (Sec. 4.1): the learning rate of
each iteration, which image each data cursor position holds, and the seeds of
each image's randomness.

Determinism: the image order is an epoch-wise permutation drawn from the seed;
image position c (the data cursor, c = iteration * images_per_batch + j) gets
its own numpy Generator for the sample (flip) and its own torch seed for the
model's randomness (ROI sampling, dropout), both derived from (seed, c). So the
images and their randomness per update do not depend on the number of workers
or on where a run was interrupted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np
import torch

from ion.errors import UserError

# Streams of the seed (numpy SeedSequence entropy): independent random numbers
# for the image order, the per-image sample (flip) and the per-image model RNG.
ORDER_STREAM, SAMPLE_STREAM, MODEL_STREAM = 0, 1, 2


class PhaseSpec(Protocol):
    """What the loop reads of a phase (stages/train_config.py PhaseConfig has these)."""

    name: str
    iterations: int
    frozen: tuple[str, ...]
    lr_start: float
    lr_end: float
    momentum: float
    weight_decay: float
    dropout: bool
    reset_momentum: bool
    init_from: Optional[str]
    init_optimizer: bool


@dataclass(frozen=True)
class Phase:
    """A phase built in code rather than read from a config (the RPN's schedule):
    PhaseSpec's fields, with SGD's usual momentum and weight decay."""

    name: str
    iterations: int
    lr_start: float
    lr_end: float
    frozen: tuple[str, ...] = ()
    momentum: float = 0.9
    weight_decay: float = 0.0005
    dropout: bool = False
    reset_momentum: bool = False
    init_from: Optional[str] = None
    init_optimizer: bool = False


def phase_lr(phase: PhaseSpec, i: int) -> float:
    """Learning rate of iteration i (0-based) of a phase: exponential decay from
    lr_start at i = 0 to lr_end at i = iterations - 1 (Sec. 4.1):
    lr_i = lr_start * (lr_end / lr_start) ** (i / (iterations - 1))."""
    n = phase.iterations
    assert 0 <= i < n
    if i == 0:
        return float(phase.lr_start)
    if i == n - 1:
        return float(phase.lr_end)
    return float(phase.lr_start * (phase.lr_end / phase.lr_start) ** (i / (n - 1)))


def image_order(*, seed: int, epoch: int, num_images: int) -> np.ndarray:
    """int64 (num_images,): the image indices of one epoch, a permutation fixed by (seed, epoch)."""
    return np.random.default_rng([ORDER_STREAM, seed, epoch]).permutation(num_images)


class ImageOrder:
    """Data cursor position -> image index: position c is entry c % n of epoch c // n."""

    def __init__(self, *, seed: int, num_images: int) -> None:
        if num_images < 1:
            raise UserError("training split: no images to train on (check the data stage's train split)")
        self.seed = seed
        self.num_images = num_images
        self._epochs: dict[int, np.ndarray] = {}

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_images)
        if epoch not in self._epochs:
            # Two epochs cached: loading ahead may straddle an epoch boundary.
            self._epochs = {e: o for e, o in self._epochs.items() if e == epoch - 1}
            self._epochs[epoch] = image_order(seed=self.seed, epoch=epoch, num_images=self.num_images)
        return int(self._epochs[epoch][offset])


def step_positions(*, iteration: int, images_per_batch: int, rank: int, world_size: int) -> range:
    """Data cursor positions worker `rank` of `world_size` trains on in update `iteration`.

    The minibatch is positions [iteration * B, (iteration + 1) * B); worker r
    takes the r-th contiguous block of B / W. With one worker that is the whole
    minibatch (accumulated), so N workers and one see the same images per update.
    """
    assert images_per_batch % world_size == 0 and 0 <= rank < world_size
    per_worker = images_per_batch // world_size
    first = iteration * images_per_batch + rank * per_worker
    return range(first, first + per_worker)


def sample_rng(*, seed: int, position: int) -> np.random.Generator:
    """The Generator the sample at data cursor `position` draws from (e.g. its flip)."""
    return np.random.default_rng([SAMPLE_STREAM, seed, position])


def model_seed(*, seed: int, position: int) -> int:
    """The torch seed set before the model's pass over the image at `position`."""
    return int(np.random.SeedSequence([MODEL_STREAM, seed, position]).generate_state(1, dtype=np.uint64)[0])


def seed_model_rng(value: int, device: torch.device) -> None:
    """Seed the torch generators the model's pass draws from: the CPU one and,
    on a GPU, that device's. (torch.manual_seed would also queue a lazy seed
    call for every other device type each time: ~1 ms per image.)"""
    torch.default_generator.manual_seed(value)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None
                                      else torch.cuda.current_device()].manual_seed(value)
