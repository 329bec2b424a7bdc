"""The train stage (stages/train.py) on a tiny split: checkpoints, model files, plots, resume, user errors."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ion.engine.checkpoint import load_checkpoint
from ion.errors import UserError
from stages.train_config import PhaseConfig, TrainConfig
from tests.helpers import assert_states_equal, write_tiny_split


class StageContext:
    """The parts of stages.contract.StageContext the train stage uses."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.workdir = None
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, metrics))

    def progress(self, iterable, desc, total=None, unit="items"):
        return iterable

    def log_model(self, artifacts):
        self.models = dict(artifacts)

    def train_placement(self, workers=None):
        return False, False  # one CPU process, as RunContext for train_workers 1 on the CPU

    def graceful_stop(self):
        import contextlib
        return contextlib.nullcontext(lambda: False)


def tiny_stage_config(**train):
    import types

    from ion.modeling.config import ContextConfig, InputConfig, ModelConfig, RoiSamplingConfig

    model = ModelConfig(width=0.0625, batchnorm=True, pool_from=("conv4", "conv5"), pool_size=3, fc_dim=16,
                        context=ContextConfig(kind="global"), seg_loss_weight=1.0,
                        input=InputConfig(min_size=48, max_size=64), sampling=RoiSamplingConfig(rois_per_image=16))
    phases = (PhaseConfig(name="scratch", iterations=3, lr_start=0.01, lr_end=0.005),
              PhaseConfig(name="tune", iterations=2, frozen=("conv1",), lr_start=0.005, lr_end=0.001))
    settings = dict(phases=phases, checkpoint_every=2, log_every=1, loader_threads=1)
    settings.update(train)
    return types.SimpleNamespace(seed=0, model=model, train=TrainConfig(**settings))


def test_train_stage_writes_checkpoints_model_and_plots_and_resumes(tmp_path):
    from stages import train as stage
    from stages.contract import RuntimeConfig

    root = write_tiny_split(tmp_path)
    inputs = {"data": root / "data", "proposals": root / "proposals"}
    cfg = tiny_stage_config()
    ctx = StageContext(RuntimeConfig(device="cpu"))
    out = tmp_path / "out"
    out.mkdir()
    result = stage.run(cfg, inputs, out, ctx)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "phase0_scratch.pt",
                                                                       "phase1_tune.pt"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["loss_phase0_scratch.png", "loss_phase1_tune.png"]
    assert [step for step, _ in ctx.logged] == [1, 2, 3, 4, 5]
    assert {"loss", "loss_cls", "loss_bbox", "loss_seg", "lr", "grad_norm", "images_per_s"} <= set(ctx.logged[0][1])
    assert result.metrics["iterations"] == 5.0 and math.isfinite(result.metrics["final_loss"])
    model, model_cfg = stage.load_trained_detector(out, device=torch.device("cpu"))
    assert model_cfg == dataclasses.replace(cfg.model, imagenet_weights=None) and not model.training
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert_states_equal(model.state_dict(), last["model"])

    # A rerun with the same key (same out) resumes: nothing left to do, same weights.
    (out / "final.pt").unlink()
    again = stage.run(cfg, inputs, out, StageContext(RuntimeConfig(device="cpu")))
    assert "resumed at iteration 5" in again.summary[0]
    assert_states_equal(load_checkpoint(out / "final.pt")["model"], last["model"])


def test_train_stage_user_errors(tmp_path):
    from stages import train as stage
    from stages.contract import RuntimeConfig

    root = write_tiny_split(tmp_path)
    inputs = {"data": root / "data", "proposals": root / "proposals"}
    cfg = tiny_stage_config(phases=(PhaseConfig(name="ss", iterations=1, proposals="selective_search"),))
    with pytest.raises(UserError, match=r"train.phases\[0\].proposals: 'selective_search' needs .*"
                                        r"selective_search_train.h5"):
        stage.run(cfg, inputs, tmp_path / "out", StageContext(RuntimeConfig(device="cpu")))
    with pytest.raises(UserError, match="runtime.train_workers: 3 does not divide train.images_per_batch 4"):
        stage.run(tiny_stage_config(), inputs, tmp_path / "out",
                  StageContext(RuntimeConfig(device="cpu", train_workers=3)))
