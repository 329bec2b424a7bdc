"""Gradient all-reduce across workers that overlaps the backward pass.

Each worker accumulates the gradients of its images of a minibatch, then the
sums are added up across workers. Waiting for the whole backward before
sending anything leaves the network idle during backward and the GPU idle
during the exchange; DDP's answer is buckets sent as soon as their gradients
are final. Here the gradients are final only during the backward of a
worker's last image of the update, so the hooks do nothing until `arm()`.

Buckets are identical on every worker and launched strictly in bucket order
(collectives must be issued in the same order everywhere). At a phase start
they follow reverse registration order; after the phase's first update they
are rebuilt in the order rank 0's backward produced the gradients (one
broadcast per phase), parameters that got none last, so the first buckets
fill early and are sent while backward goes on. A bucket
waits until every parameter in it has its gradient; the ones that got none in
this backward (not used by this worker's last image) are completed in
`finish()`, which zero-fills gradients that are still missing (as the
single-process update does) and sends the rest in order.

DDP itself would fix at construction which parameters carry gradients; the
frozen groups change from one phase to the next, so the buckets are rebuilt
with `set_trainable` at every phase start.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket_cap_mb


class OverlappedAllReduce:
    """Sum gradients across the process group, bucket by bucket, during backward."""

    def __init__(self, params: Sequence[Tensor], *, bucket_bytes: int = BUCKET_BYTES) -> None:
        self._params = list(params)
        self._bucket_bytes = bucket_bytes
        self._armed = False
        self._buckets: list[list[Tensor]] = []
        self._bucket_of: dict[int, int] = {}
        self._handles = [p.register_post_accumulate_grad_hook(self._ready) for p in self._params]
        self._reset()

    def set_trainable(self) -> None:
        """Rebuild the buckets from the parameters that require a gradient now (at a phase start)."""
        self._build([p for p in reversed(self._params) if p.requires_grad])
        self._order_known = False

    def _build(self, trainable: list[Tensor]) -> None:
        self._buckets, current, size = [], [], 0
        for p in trainable:
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= self._bucket_bytes:
                self._buckets.append(current)
                current, size = [], 0
        if current:
            self._buckets.append(current)
        self._bucket_of = {id(p): i for i, bucket in enumerate(self._buckets) for p in bucket}
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._reset()

    def _reset(self) -> None:
        self._pending = [len(b) for b in self._buckets]  # parameters still without their final gradient
        self._next = 0  # the next bucket to launch
        self._launched: list[tuple[Tensor, list[Tensor], object]] = []
        self._fired: list[int] = []  # parameter indices in the order their gradients became final

    def arm(self) -> None:
        """The next backward is this update's last on this worker: its gradients are final."""
        self._armed = True

    def _ready(self, param: Tensor) -> None:
        if not self._armed:
            return
        index = self._bucket_of.get(id(param))
        if index is None:
            return
        self._fired.append(self._index[id(param)])
        self._pending[index] -= 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self._buckets) and self._pending[self._next] == 0:
            self._launch(self._next)
            self._next += 1

    def _launch(self, index: int) -> None:
        grads = [p.grad for p in self._buckets[index]]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._launched.append((flat, grads, dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)))

    def finish(self) -> None:
        """After the last backward: send what is left (missing gradients as
        zeros), wait for every bucket, and write the sums back into .grad."""
        for bucket in self._buckets:
            for p in bucket:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        self._pending = [0] * len(self._buckets)
        self._launch_ready()
        for flat, grads, handle in self._launched:
            handle.wait()
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        self._armed = False
        if not self._order_known:
            self._learn_order()
        self._reset()

    def _learn_order(self) -> None:
        """Buckets in the order rank 0's gradients became final (the same on every worker)."""
        trainable = [i for i, p in enumerate(self._params) if id(p) in self._bucket_of]
        fired = list(dict.fromkeys(self._fired))
        seen = set(fired)
        order = [fired + [i for i in reversed(trainable) if i not in seen]]
        device = self._params[0].device if dist.get_backend() == "nccl" else None
        dist.broadcast_object_list(order, src=0, device=device)
        self._build([self._params[i] for i in order[0]])
        self._order_known = True

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
