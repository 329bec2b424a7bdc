"""ion/engine/grad_sync.py with two real gloo processes: the buckets sum the
gradients across workers exactly as one process adding them up, the first
buckets leave during the last backward (overlap), and parameters that got no
gradient end with zeros on every worker."""
from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ion.engine.grad_sync import OverlappedAllReduce

WORLD = 2
IMAGES_PER_WORKER = 2


def _model() -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict({"a": nn.Linear(8, 16), "b": nn.Linear(16, 16), "c": nn.Linear(16, 4),
                          "unused": nn.Linear(3, 3)})


def _backward(model: nn.ModuleDict, rank: int, image: int) -> None:
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(100 * rank + image), dtype=torch.float64)
    model["c"](torch.relu(model["b"](torch.relu(model["a"](x))))).square().sum().backward()


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    model = _model().double()
    sync = OverlappedAllReduce(list(model.parameters()), bucket_bytes=512)  # several buckets
    sync.set_trainable()
    for update in range(2):  # the first update learns the order the gradients come in
        model.zero_grad(set_to_none=True)
        for image in range(IMAGES_PER_WORKER):
            if image == IMAGES_PER_WORKER - 1:
                sync.arm()
            _backward(model, rank, image)
        sent_during_backward = len(sync._launched)
        sync.finish()
    torch.save({"grads": {n: p.grad for n, p in model.named_parameters()}, "sent": sent_during_backward},
               Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_overlapped_buckets_sum_like_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    reference = _model().double()
    for rank in range(WORLD):
        for image in range(IMAGES_PER_WORKER):
            _backward(reference, rank, image)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert result["sent"] >= 1  # buckets left before finish(): during the backward
        for name, param in reference.named_parameters():
            want = param.grad if param.grad is not None else torch.zeros_like(param)
            torch.testing.assert_close(result["grads"][name], want, rtol=1e-12, atol=1e-12)
