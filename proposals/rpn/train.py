"""Training the RPN: both heads and the unfrozen backbone groups, jointly."""
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from proposals.rpn.config import RpnConfig
from proposals.rpn.losses import TrainSample, image_losses
from proposals.rpn.model import RegionProposalNetwork

Progress = Callable[[Iterable, str], Iterable]


@dataclass(frozen=True)
class TrainStep:
    """One logged training iteration."""
    iteration: int
    lr: float
    loss: float
    losses: dict[str, float]  # "<variant>/objectness", "<variant>/deltas"


def learning_rate(cfg: RpnConfig, iteration: int) -> float:
    """cfg.lr, divided by 10 from iteration lr_step * iterations on (Faster R-CNN's step)."""
    return cfg.lr if iteration < cfg.lr_step * cfg.iterations else cfg.lr * 0.1


def make_optimizer(model: RegionProposalNetwork, cfg: RpnConfig) -> torch.optim.SGD:
    """SGD with weight decay on conv weights only: biases, batch-norm and L2
    scale parameters are not decayed (decaying the L2 scale would shrink RPN2's
    input amplitude, the thing the scale exists to set)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=cfg.lr, momentum=cfg.momentum)


def train_rpn(model: RegionProposalNetwork, images_iter: Iterable[TrainSample], cfg: RpnConfig,
              progress: Optional[Progress] = None, *, seed: int = 0) -> list[TrainStep]:
    """Train both heads (and the unfrozen backbone groups) jointly with SGD for
    cfg.iterations steps of cfg.images_per_batch images, mirrored at random
    when cfg.flip. The sum of RPN1's and RPN2's losses is minimised.

    `images_iter` yields (image uint8 (H, W, 3), boxes float32 (G, 4) xyxy,
    iscrowd bool (G,)); when it runs out it is iterated again from the start
    (so pass a re-iterable sequence, or a generator long enough).
    `progress(iterable, desc)` wraps the iteration loop (e.g. ctx.progress).
    Flips and anchor sampling are drawn from a generator seeded with `seed`.
    Returns one TrainStep per iteration. Raises FloatingPointError at the first
    non-finite loss, naming the iteration and the loss terms.
    """
    model.backbone.set_frozen(tuple(cfg.frozen))
    model.train()
    optimizer = make_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(seed)
    samples = _cycle(images_iter)
    steps: Iterable[int] = range(cfg.iterations)
    if progress is not None:
        steps = progress(steps, "train rpn")
    history: list[TrainStep] = []
    for iteration in steps:
        lr = learning_rate(cfg, iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for _ in range(cfg.images_per_batch):
            flip = cfg.flip and bool(torch.rand((), generator=generator) < 0.5)
            losses = image_losses(model, next(samples), cfg, flip=flip, generator=generator)
            loss = sum(losses.values()) / cfg.images_per_batch
            if not torch.isfinite(loss):
                terms = {k: v.item() for k, v in losses.items()}
                raise FloatingPointError(f"RPN training: non-finite loss at iteration {iteration}: {terms}")
            loss.backward()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + v.item() / cfg.images_per_batch
        optimizer.step()
        history.append(TrainStep(iteration=iteration, lr=lr, loss=sum(totals.values()), losses=totals))
    model.eval()
    return history


def _cycle(samples: Iterable[TrainSample]):
    """Yield from `samples` forever, restarting it when it runs out."""
    while True:
        empty = True
        for sample in samples:
            empty = False
            yield sample
        if empty:
            raise ValueError("train_rpn: the training images ran out (or there were none); "
                             "pass a re-iterable sequence of (image, boxes, iscrowd)")
