"""The train stage learns on the synthetic data: the loss falls."""
import dataclasses

import numpy as np

import stages.train as train_stage
from tests.helpers import FakeContext


def test_loss_falls_on_the_synthetic_data(smoke_run, tmp_path):
    cfg = smoke_run.cfg
    phase = dataclasses.replace(cfg.train.phases[0], name="learn", iterations=40, frozen=(),
                                lr_start=0.01, lr_end=0.005)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, phases=(phase,), log_every=1,
                                                             checkpoint_every=40))
    ctx = FakeContext(tmp_path)
    ctx.runtime = cfg.runtime
    out = tmp_path / "train"
    out.mkdir()
    train_stage.run(cfg, {"data": smoke_run.dirs["data"], "proposals": smoke_run.dirs["proposals"]}, out, ctx)
    losses = [metrics["loss"] for metrics, _ in sorted(ctx.metrics, key=lambda m: m[1]) if "loss" in metrics]
    assert len(losses) == 40
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    # From ~log(K+1) at the start, the classifier must learn the background/foreground split at least.
    assert last < 0.8 * first, (first, last)
