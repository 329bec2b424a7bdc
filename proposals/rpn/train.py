"""Training the RPN on ion/engine/: both heads and the unfrozen backbone
groups, jointly, with the engine's checkpoints, logging and Ray Train support.

The RPN's recipe (Faster R-CNN, Ren et al. Sec. 3.1.3 and 3.3) expressed in
the engine's terms:
  - the schedule: phase 'rpn' at cfg.lr for the first lr_step * iterations
    updates, phase 'rpn_step' at cfg.lr / 10 for the rest (a phase with no
    updates is left out); momentum and frozen groups the same in both;
  - weight decay on convolution weights only (`RpnLossModel.parameter_groups`);
  - one update = cfg.images_per_batch single-image passes, gradients summed
    then averaged, no clipping;
  - flips drawn from the engine's per-position sample Generator, anchor
    sampling from torch's global generator, which the engine seeds per image
    position: the randomness depends only on (seed, position), so a resumed
    run and several workers match one uninterrupted process.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ion.engine.checkpoint import CheckpointEvent
from ion.engine.loop import TrainResult, TrainSample, train
from ion.engine.schedule import Phase
from ion.ops.box_ops import flip_boxes_xyxy
from proposals.rpn.config import RpnConfig
from proposals.rpn.losses import rpn_losses
from proposals.rpn.model import RegionProposalNetwork, flatten_head_outputs, image_anchors, prepare_image

# One training image: uint8 (H, W, 3) RGB, ground-truth boxes float32 (G, 4)
# xyxy in image pixels, iscrowd bool (G,).
RpnImage = tuple[np.ndarray, np.ndarray, np.ndarray]

LR_STEP_FACTOR = 0.1  # Faster R-CNN divides the learning rate by 10 once


def rpn_phases(cfg: RpnConfig) -> tuple[Phase, ...]:
    """The RPN's schedule as engine phases: iteration i (0-based) runs at cfg.lr
    while i < lr_step * iterations, at cfg.lr / 10 from then on."""
    before = min(cfg.iterations, math.ceil(cfg.lr_step * cfg.iterations))
    common = dict(frozen=tuple(cfg.frozen), momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    phases = [Phase(name="rpn", iterations=before, lr_start=cfg.lr, lr_end=cfg.lr, **common),
              Phase(name="rpn_step", iterations=cfg.iterations - before, lr_start=cfg.lr * LR_STEP_FACTOR,
                    lr_end=cfg.lr * LR_STEP_FACTOR, **common)]
    return tuple(p for p in phases if p.iterations > 0)


class RpnLossModel(nn.Module):
    """The RPN in the engine's train-mode form:
    forward(image Tensor[1, 3, H, W], proposals Tensor[0, 4] (unused),
            targets {"boxes": Tensor[G, 4] xyxy in `image`'s pixels, "iscrowd": bool Tensor[G]})
    -> {"rpn1/objectness", "rpn1/deltas", "rpn2/objectness", "rpn2/deltas"} scalars.
    Its state_dict is the RPN's with the prefix "rpn."."""

    def __init__(self, rpn: RegionProposalNetwork, cfg: RpnConfig) -> None:
        super().__init__()
        self.rpn = rpn
        self.cfg = cfg

    @property
    def backbone(self) -> nn.Module:
        """The RPN's backbone: the engine freezes its groups per phase."""
        return self.rpn.backbone

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Weight decay on convolution weights only: biases, batch-norm and the
        L2 scales are not decayed (decaying RPN2's L2 scale would shrink its
        input amplitude, the thing the scale exists to set)."""
        decay = [p for p in self.rpn.parameters() if p.ndim > 1]
        rest = [p for p in self.rpn.parameters() if p.ndim <= 1]
        return [{"name": "conv_weights", "params": decay},
                {"name": "no_decay", "params": rest, "weight_decay_mult": 0.0}]

    def forward(self, image: Tensor, proposals: Tensor, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        outputs = self.rpn(image)
        anchors = image_anchors(self.rpn, outputs["rpn1"][0])
        losses: dict[str, Tensor] = {}
        for variant, (objectness, deltas) in outputs.items():
            logits, d = flatten_head_outputs(objectness, deltas)
            terms = rpn_losses(logits=logits[0], deltas=d[0], anchors=anchors, gt_boxes=targets["boxes"],
                               gt_iscrowd=targets["iscrowd"], cfg=self.cfg)
            losses.update({f"{variant}/{k}": v for k, v in terms.items()})
        return losses


class RpnSamples:
    """The engine's get_sample over RPN training images: (image index, phase
    index, Generator) -> TrainSample, the image resized, normalised and
    mirrored when the Generator says so (cfg.flip), its boxes likewise.

    `images[i]` -> RpnImage (a list, or a sequence that loads lazily)."""

    def __init__(self, images: Sequence[RpnImage], cfg: RpnConfig) -> None:
        self.images = images
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.images)

    def __call__(self, index: int, phase_index: int, rng: np.random.Generator) -> TrainSample:
        image, boxes, iscrowd = self.images[index]
        flip = self.cfg.flip and bool(rng.random() < 0.5)
        x = prepare_image(image, min_size=self.cfg.min_size, max_size=self.cfg.max_size, flip=flip,
                          device=torch.device("cpu"))  # (1, 3, Hr, Wr)
        H, W = image.shape[:2]
        Hr, Wr = x.shape[-2:]
        gt = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))  # (G, 4)
        if flip:
            gt = flip_boxes_xyxy(gt, width=float(W))
        gt = gt * gt.new_tensor([Wr / W, Hr / H, Wr / W, Hr / H])
        crowd = torch.as_tensor(np.asarray(iscrowd, dtype=bool).reshape(-1))  # (G,)
        return TrainSample(image=x, proposals=torch.zeros(0, 4), targets={"boxes": gt, "iscrowd": crowd})


def _not_kept(state: dict[str, Any], event: CheckpointEvent) -> str:
    return "not kept (no checkpoint directory given)"


def train_rpn(model: RegionProposalNetwork, images: Sequence[RpnImage], cfg: RpnConfig, *, seed: int,
              save_checkpoint: Callable[[dict[str, Any], CheckpointEvent], str] = _not_kept,
              resume: Optional[dict[str, Any]] = None,
              log_metrics: Optional[Callable[[int, dict[str, float]], None]] = None,
              on_iteration: Optional[Callable[[int], None]] = None, device: torch.device | str = "cpu",
              rank: int = 0, world_size: int = 1, should_stop: Optional[Callable[[], bool]] = None) -> TrainResult:
    """Train `model` (both heads and the unfrozen backbone groups, in place) for
    cfg.iterations updates of cfg.images_per_batch images on ion/engine/.

    images: the training images (module docstring), in the engine's seeded
    epoch order. save_checkpoint / resume / log_metrics / on_iteration / rank /
    world_size / should_stop: as ion.engine.loop.train (the checkpoint's "model" is
    RpnLossModel's state_dict). A non-finite loss raises the engine's
    NonFiniteLossError naming the iteration and the loss terms. The model is
    left in eval mode.
    """
    if len(images) == 0:
        raise ValueError("train_rpn: no training images (each needs at least one non-crowd box)")
    wrapper = RpnLossModel(model, cfg)
    try:
        return train(model=wrapper, phases=rpn_phases(cfg), num_images=len(images),
                     get_sample=RpnSamples(images, cfg), seed=seed, save_checkpoint=save_checkpoint,
                     log_metrics=log_metrics, on_iteration=on_iteration, resume=resume,
                     images_per_batch=cfg.images_per_batch, clip_grad_norm=None, momentum_semantics="caffe",
                     checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, device=device,
                     rank=rank, world_size=world_size, should_stop=should_stop)
    finally:
        model.eval()


def rpn_state_dict(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The RPN's own state_dict inside an engine checkpoint of RpnLossModel."""
    prefix = "rpn."
    return {k[len(prefix):]: v for k, v in checkpoint["model"].items() if k.startswith(prefix)}
