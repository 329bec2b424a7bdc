"""The `train` config section: the phase schedule and the minibatch recipe.

Field conventions (docs/CONTRACTS.md): frozen dataclasses, every field has a
default and a one-line `help`; `min`/`max` are inclusive bounds checked by the
loader in pipeline/config/__init__.py; `__post_init__` raises ValueError for the rules
that bounds cannot say.

The number of data-parallel workers is `runtime.train_workers` (not part of
the cache key: N workers see the same images per update as one process that
accumulates them). The image order is not a field here either: it comes from the root `seed` (an
epoch-wise permutation of the training images, ion/engine/), so ablation
variants with the same seed see the same images in the same order (Sec. 4.1).

The paper's schedules as phase lists (Sec. 4.1 and the Appendix):

    # Sec. 4.1 (COCO): conv1-conv5 frozen, then conv1-conv2 frozen
    - {name: frozen_convs, iterations: 80000, frozen: [conv1, conv2, conv3, conv4, conv5],
       lr_start: 5.0e-3, lr_end: 1.0e-4}
    - {name: finetune, iterations: 320000, frozen: [conv1, conv2], lr_start: 1.0e-3, lr_end: 1.0e-5}
    # Appendix 4(b) (competition): MCG+RPN proposals, from the 4.1 network
    - {name: mix_frozen, iterations: 100000, frozen: [conv1, conv2, conv3, conv4, conv5],
       lr_start: 5.0e-3, lr_end: 1.0e-4, proposals: mix, init_from: <run (a)>/final.pt}
    - {name: mix_finetune, iterations: 80000, frozen: [conv1, conv2], lr_start: 1.0e-3, lr_end: 1.0e-5,
       proposals: mix}
    # Appendix, post-competition 1(a), 1(b): momentum 0.99 with the learning rate / 10
    - {name: post_finetune, iterations: 80000, frozen: [conv1, conv2], lr_start: 1.0e-4, lr_end: 1.0e-6,
       momentum: 0.99, proposals: mix}
    - {name: post_all, iterations: 160000, frozen: [], lr_start: 1.0e-4, lr_end: 1.0e-6,
       momentum: 0.99, proposals: mix}
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional

__all__ = ["BACKBONE_GROUPS", "PROPOSAL_SETS", "PhaseConfig", "TrainConfig"]

BACKBONE_GROUPS = ("conv1", "conv2", "conv3", "conv4", "conv5")
# Which proposal file a phase trains on: "mix" is the proposals stage's train
# mix (<proposals>/mixed_train.h5, 1000 MCG + 1000 RPN1 in the Appendix, item 2);
# a source name reads <proposals>/sources/<source>_train.h5.
PROPOSAL_SETS = ("mix", "selective_search", "mcg", "rpn1", "rpn2")
_PHASE_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass(frozen=True)
class PhaseConfig:
    """One training phase: a run of iterations with one frozen set and one
    exponentially decaying learning rate (Sec. 4.1)."""

    name: str = field(
        default="phase",
        metadata={"help": "phase name; its end checkpoint is checkpoints/phase<i>_<name>.pt "
                          "(letters, digits, _ and -)"})
    iterations: int = field(default=1000, metadata={"help": "minibatch updates in this phase", "min": 1})
    frozen: tuple[str, ...] = field(
        default=(),
        metadata={"help": "backbone groups kept fixed (conv1..conv5); Sec. 4.1 freezes conv1-conv5, "
                          "then conv1-conv2"})
    lr_start: float = field(
        default=1e-3,
        metadata={"help": "learning rate of the phase's first iteration (exponential decay to lr_end)",
                  "min": 0.0})
    lr_end: float = field(
        default=1e-5, metadata={"help": "learning rate of the phase's last iteration", "min": 0.0})
    momentum: float = field(
        default=0.9,
        metadata={"help": "SGD momentum; the post-competition phases use 0.99 with the learning rate / 10",
                  "min": 0.0, "max": 1.0})
    weight_decay: float = field(default=5e-4, metadata={"help": "L2 weight decay (Fast R-CNN's 0.0005)",
                                                       "min": 0.0})
    proposals: Literal["mix", "selective_search", "mcg", "rpn1", "rpn2"] = field(
        default="mix",
        metadata={"help": "proposal set trained on: the train mix (MCG+RPN, Appendix item 2) or one source"})
    dropout: bool = field(default=True, metadata={"help": "dropout on in this phase (Table 1, 'D' removes it)"})
    reset_momentum: bool = field(
        default=False,
        metadata={"help": "zero the momentum buffers when this phase starts (the paper keeps them: "
                          "resetting costs several AP points, Appendix)"})
    init_from: Optional[str] = field(
        default=None,
        metadata={"help": "checkpoint of another run to start this phase from (the Appendix's chain of runs)",
                  "path": True})
    init_optimizer: bool = field(
        default=False,
        metadata={"help": "also take the momentum buffers from init_from (needs a full checkpoint, "
                          "not final.pt)"})

    def __post_init__(self) -> None:
        if not _PHASE_NAME.match(self.name):
            raise ValueError(f"name: {self.name!r} must be letters, digits, '_' or '-' (it names a file)")
        unknown = [g for g in self.frozen if g not in BACKBONE_GROUPS]
        if unknown:
            raise ValueError(f"frozen: unknown group(s) {unknown}; choose from {list(BACKBONE_GROUPS)}")
        if len(set(self.frozen)) != len(self.frozen):
            raise ValueError(f"frozen: {list(self.frozen)} lists a group twice")
        for key in ("lr_start", "lr_end"):
            if not getattr(self, key) > 0.0:
                raise ValueError(f"{key}: expected a number > 0, got {getattr(self, key)} "
                                 "(the decay is exponential, so 0 is not reachable)")
        if not self.momentum < 1.0:
            raise ValueError(f"momentum: expected a number < 1, got {self.momentum}")
        if self.init_optimizer and self.init_from is None:
            raise ValueError("init_optimizer: true needs init_from (the checkpoint whose optimizer to load)")


DEFAULT_PHASES = (
    # The embedded default trains the small backbone from scratch, so nothing is
    # frozen at first; the second phase shows the momentum-keeping phase change
    # with a continuous learning rate.
    PhaseConfig(name="scratch", iterations=300, frozen=(), lr_start=1e-2, lr_end=2e-3),
    PhaseConfig(name="finetune", iterations=200, frozen=("conv1",), lr_start=2e-3, lr_end=2e-4),
)


@dataclass(frozen=True)
class TrainConfig:
    """Multi-phase ION training (Sec. 4.1, Appendix): 4-image minibatches from
    single-image passes, gradient clipping, SGD momentum kept across phases."""

    phases: tuple[PhaseConfig, ...] = field(
        default=DEFAULT_PHASES, metadata={"help": "training phases, run in order"})
    images_per_batch: int = field(
        default=4,
        metadata={"help": "images per minibatch, one image per forward/backward pass (Sec. 4.1)", "min": 1})
    clip_grad_norm: Optional[float] = field(
        default=80.0,
        metadata={"help": "clip the L2 norm of the gradient summed over the minibatch's images at this "
                          "(Sec. 4.1: 80 for 4 images, 20 per image); null = no clipping", "min": 0.0})
    momentum_semantics: Literal["caffe", "pytorch"] = field(
        default="caffe",
        metadata={"help": "caffe (the paper's framework): the velocity includes the lr it was built with, so an lr "
                          "change applies only to new gradients; pytorch: torch.optim.SGD's buffer, whose whole "
                          "content is scaled by the current lr (ion/engine/ explains)"})
    checkpoint_every: int = field(
        default=100, metadata={"help": "write checkpoints/last.pt every N iterations (and at phase ends)",
                               "min": 1})
    log_every: int = field(
        default=10, metadata={"help": "log losses, lr, gradient norm and images/s every k iterations", "min": 1})
    flip: bool = field(default=True, metadata={"help": "random horizontal flip of training images"})
    amp: Literal["off", "bf16", "fp16"] = field(
        default="off", metadata={"help": "mixed precision of the forward pass (fp16 adds a gradient scaler)"})
    max_failures: int = field(
        default=3, metadata={"help": "Ray Train restarts of a failed worker group from the last checkpoint",
                             "min": 0})
    # 0 by default: on a CPU the loader's torch ops (resize, normalise) start
    # their own OpenMP team and fight the training threads for the cores
    # (default run: 6.3 images/s with one loader thread, 8.5 inline). A GPU
    # run leaves the CPU idle while it waits, so there a thread or two pays.
    loader_threads: int = field(
        default=0, metadata={"help": "threads loading the next images while the model trains (0 = inline; "
                                     "worth 1-4 on a GPU, slower on a CPU-only run)",
                             "min": 0})

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("phases: at least one phase is needed")
        names = [phase.name for phase in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phases: names must differ (they name the checkpoints), got {names}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0.0:
            raise ValueError(f"clip_grad_norm: expected a number > 0 or null, got {self.clip_grad_norm}")
