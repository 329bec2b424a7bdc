"""The optimizer side of a phase: frozen groups, dropout, parameter groups,
SGD built once and kept across phases, and the per-iteration hyperparameters.

Momentum: Caffe vs PyTorch (the Appendix's "0.99 momentum, lr / 10").
  Caffe keeps the velocity in weight units, v <- m v + lr g; w <- w - v.
  torch.optim.SGD keeps b <- m b + g; w <- w - lr b, so its "velocity" is lr * b.
  At a constant lr the two are the same update. When lr changes they differ:
  PyTorch applies the new lr to everything the buffer remembers, Caffe only to
  the new gradient. Across a phase boundary from lr 1e-5 to 1e-4, PyTorch's
  first steps are 10x the velocity Caffe would carry over; going from momentum
  0.9 at lr 1e-3 to 0.99 at lr 1e-4, the steady-state step is the same in both
  (lr g / (1 - m) = 1e-3 g / 0.1 = 1e-4 g / 0.01 = 1e-2 g), but PyTorch's step
  drops to a tenth at the switch and needs ~1 / (1 - 0.99) = 100 iterations
  to build back up, while Caffe's stays at 1e-2 g without a jump.
  momentum_semantics="caffe" (the default) reproduces Caffe exactly: whenever
  a parameter group's lr changes from lr_old to lr_new (every iteration under
  the exponential decay, and at phase boundaries), its momentum buffers are
  multiplied by lr_old / lr_new, so lr_new * b equals Caffe's v.
  "pytorch" leaves the buffers alone.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

GROUP_KEYS = ("params", "name", "lr_mult", "weight_decay_mult")


def set_dropout(model: nn.Module, enabled: bool) -> None:
    """Dropout on or off for a phase (Table 1, 'D').

    Calls `model.set_dropout(enabled)` when the model has one; otherwise every
    nn.Dropout* module gets p = 0 (off) or the p it was built with (on).
    """
    if hasattr(model, "set_dropout"):
        model.set_dropout(enabled)
        return
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            if not hasattr(module, "built_p"):
                module.built_p = module.p
            module.p = module.built_p if enabled else 0.0


def set_frozen(model: nn.Module, groups: tuple[str, ...]) -> None:
    """Freeze backbone groups through `model.backbone.set_frozen` (ion/modeling/backbone.py)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "set_frozen"):
        assert not groups, "a phase freezes backbone groups but the model has no backbone.set_frozen"
        return
    backbone.set_frozen(tuple(groups))


def parameter_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: `model.parameter_groups()` when the model
    has it (dicts with "params" and optional "name", "lr_mult",
    "weight_decay_mult"), else one group of all parameters. Every parameter
    must be in exactly one group, frozen ones included: the optimizer is built
    once and kept across phases."""
    if hasattr(model, "parameter_groups"):
        groups = [dict(g) for g in model.parameter_groups()]
    else:
        groups = [{"params": list(model.parameters())}]
    seen: set[int] = set()
    for g in groups:
        unknown = sorted(set(g) - set(GROUP_KEYS))
        if unknown:
            raise ValueError(f"parameter group {g.get('name', '?')}: unknown keys {unknown} (allowed: {GROUP_KEYS})")
        g["params"] = list(g["params"])
        g.setdefault("lr_mult", 1.0)
        g.setdefault("weight_decay_mult", 1.0)
        ids = {id(p) for p in g["params"]}
        if ids & seen or len(ids) != len(g["params"]):
            raise ValueError("parameter_groups(): a parameter appears twice")
        seen |= ids
    missing = [n for n, p in model.named_parameters() if id(p) not in seen]
    if missing:
        raise ValueError(f"parameter_groups(): parameters in no group: {missing[:5]}")
    return groups


def build_optimizer(model: nn.Module, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with momentum over all parameters; built once and kept across phases
    (docs/CONTRACTS.md, Training): a phase changes only lr, momentum, weight
    decay and the frozen set."""
    groups = parameter_groups(model)
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
        g["weight_decay"] = weight_decay * g["weight_decay_mult"]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def momentum_buffers(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[Tensor]:
    """The existing momentum buffers of `params` (a parameter not yet updated has none)."""
    buffers = []
    for p in params:
        buf = optimizer.state[p].get("momentum_buffer") if p in optimizer.state else None
        if buf is not None:
            buffers.append(buf)
    return buffers


def set_hyperparameters(optimizer: torch.optim.Optimizer, *, lr: float, momentum: float, weight_decay: float,
                        caffe_momentum: bool) -> None:
    """Set one iteration's lr, momentum and weight decay in every group (times
    its lr_mult / weight_decay_mult). With `caffe_momentum`, rescale the momentum
    buffers by lr_old / lr_new so the velocity lr * buffer is carried over
    unchanged, as Caffe's v = m v + lr g (module docstring)."""
    for group in optimizer.param_groups:
        new_lr = lr * group["lr_mult"]
        if caffe_momentum and group["lr"] != new_lr:
            ratio = group["lr"] / new_lr
            for buf in momentum_buffers(optimizer, group["params"]):
                buf.mul_(ratio)
        group["lr"] = new_lr
        group["momentum"] = momentum
        group["weight_decay"] = weight_decay * group["weight_decay_mult"]
