"""The training engine (ion/engine/) on a tiny detector-shaped model
(tests/helpers.py's TinyDetector: forward(image, proposals, targets) -> loss
dict, backbone.set_frozen(groups), dropout and random ROI sampling, so the
per-image RNG handling is exercised). The train stage's own tests are in
tests/stages/test_train_stage.py."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ion.engine.checkpoint import CheckpointFiles, load_checkpoint
from ion.engine.loop import NonFiniteLossError, TrainSample, enter_phase, train
from ion.engine.optim import build_optimizer, momentum_buffers
from ion.engine.schedule import ImageOrder, image_order, phase_lr, step_positions
from ion.errors import Interrupted, UserError
from stages.train_config import PhaseConfig, TrainConfig
from tests.helpers import NUM_IMAGES, TinyDetector, assert_states_equal, tiny_sample, write_tiny_split

TWO_PHASES = (
    PhaseConfig(name="first", iterations=5, frozen=("conv1",), lr_start=0.05, lr_end=0.01, momentum=0.9),
    PhaseConfig(name="second", iterations=4, frozen=("conv1", "conv2"), lr_start=0.02, lr_end=0.002,
                momentum=0.99, weight_decay=1e-3),
)


def new_model(seed: int = 0) -> TinyDetector:
    torch.manual_seed(seed)
    return TinyDetector()


def run(directory: Path, *, phases=TWO_PHASES, resume=None, get_sample=tiny_sample, model=None, **kwargs):
    settings = dict(seed=3, images_per_batch=4, checkpoint_every=3, log_every=2, loader_threads=0)
    settings.update(kwargs)
    model = model if model is not None else new_model()
    files = CheckpointFiles(directory)
    result = train(model=model, phases=phases, num_images=NUM_IMAGES, get_sample=get_sample,
                   save_checkpoint=files, resume=resume, **settings)
    return model, result, files


def without_speed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in rec.items() if k != "images_per_s"} for rec in history]


class Killed(Exception):
    """Stands in for the process dying."""


def killing_at(position: int):
    """A get_sample that dies when it is asked for data position `position` (once)."""
    calls = {"done": False}

    def get_sample(index, phase_index, rng):
        # The position's Generator is seeded from it; recover it by comparing draws.
        if not calls["done"] and _position_of(rng) == position:
            calls["done"] = True
            raise Killed(f"killed at position {position}")
        return tiny_sample(index, phase_index, rng)

    return get_sample


def _position_of(rng: np.random.Generator) -> int:
    from ion.engine.schedule import sample_rng
    state = rng.bit_generator.state["state"]["state"]
    for position in range(200):
        if sample_rng(seed=3, position=position).bit_generator.state["state"]["state"] == state:
            return position
    raise AssertionError("unknown generator")


# ---------------------------------------------------------------- exact resume


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model, result, files = run(tmp_path_factory.mktemp("reference"))
    return model, result, load_checkpoint(files.last)


@pytest.mark.parametrize("kill_position, threads", [
    (4 * 4 + 0, 0),   # between updates: before iteration 4 (last checkpoint: iteration 3)
    (7 * 4 + 2, 1),   # inside the 4-image accumulation of iteration 7, images loaded ahead by a thread
    (5 * 4 + 0, 0),   # across the phase boundary: first image of phase 2 (last checkpoint: phase 1's end)
])
def test_killed_and_resumed_run_ends_bitwise_equal(tmp_path, uninterrupted, kill_position, threads):
    ref_model, ref_result, ref_last = uninterrupted
    with pytest.raises(Killed):
        run(tmp_path, get_sample=killing_at(kill_position), loader_threads=threads)
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["iteration"] < kill_position // 4 + 1
    # A new process: a fresh model (different init) resumes from last.pt.
    model, result, files = run(tmp_path, resume=saved, model=new_model(seed=99), loader_threads=threads)
    assert_states_equal(model.state_dict(), ref_model.state_dict())
    last = load_checkpoint(files.last)
    assert_states_equal(last["optimizer"], ref_last["optimizer"])
    assert_states_equal(last["model"], ref_last["model"])
    assert without_speed(result.history) == without_speed(ref_result.history)
    assert result.iterations == ref_result.iterations == 9


def test_stop_request_checkpoints_the_update_and_the_resume_ends_bitwise_equal(tmp_path, uninterrupted):
    """A SIGTERM in the CLI turns should_stop() True: the engine finishes the
    update, checkpoints it (iteration 2 is no checkpoint_every multiple) and stops."""
    ref_model, ref_result, ref_last = uninterrupted
    updates = []
    with pytest.raises(Interrupted, match="training stopped after iteration 2; checkpoint: .*last.pt"):
        run(tmp_path, on_iteration=updates.append, should_stop=lambda: len(updates) >= 2)
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["iteration"] == 2 and updates == [1, 2]
    model, result, _ = run(tmp_path, resume=saved, model=new_model(seed=99))
    assert_states_equal(model.state_dict(), ref_model.state_dict())
    assert without_speed(result.history) == without_speed(ref_result.history)


def test_checkpoint_files_and_contents(uninterrupted, tmp_path):
    _, _, files = run(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last.pt", "phase0_first.pt", "phase1_second.pt"]
    phase0 = load_checkpoint(files.phase_path(0, "first"))
    # Position normalised to "next update": phase 1, its iteration 0, after 5 updates.
    assert (phase0["phase_index"], phase0["phase_iteration"], phase0["iteration"]) == (1, 0, 5)
    assert phase0["cursor"] == 5 * 4
    assert set(phase0["rng"]) == {"python", "numpy", "torch", "cuda"}
    last = load_checkpoint(files.last)
    assert (last["phase_index"], last["iteration"]) == (2, 9)


def test_resume_rejects_a_checkpoint_of_another_run(tmp_path, uninterrupted):
    _, _, ref_last = uninterrupted
    with pytest.raises(UserError, match="belongs to another run.*seed"):
        run(tmp_path, resume=ref_last, seed=4)


# ---------------------------------------------------------------- phases, momentum, freezing


@pytest.mark.parametrize("semantics", ["caffe", "pytorch"])
def test_momentum_kept_across_phases_or_reset(tmp_path, semantics):
    """Both runs are identical up to phase 2's first update, so that update's
    gradient d is the same in both: kept buffer = m * ratio * b_end_of_phase_1 + d,
    reset buffer = d (ratio = lr_old / lr_new for Caffe semantics, 1 for PyTorch's)."""
    reset_phases = (TWO_PHASES[0], dataclasses.replace(TWO_PHASES[1], reset_momentum=True))
    states = {}
    for name, phases in (("kept", TWO_PHASES), ("reset", reset_phases)):
        # Dies before update 6, so last.pt holds the state after phase 2's first update.
        with pytest.raises(Killed):
            run(tmp_path / name, phases=phases, checkpoint_every=1, momentum_semantics=semantics,
                get_sample=killing_at(6 * 4))
        states[name] = load_checkpoint(tmp_path / name / "last.pt")
        assert states[name]["iteration"] == 6
    end1 = load_checkpoint(tmp_path / "kept" / "phase0_first.pt")
    assert_states_equal(end1["model"], load_checkpoint(tmp_path / "reset" / "phase0_first.pt")["model"])
    ratio = TWO_PHASES[0].lr_end / TWO_PHASES[1].lr_start if semantics == "caffe" else 1.0
    m = TWO_PHASES[1].momentum
    before = end1["optimizer"]["state"]
    kept, reset = states["kept"]["optimizer"]["state"], states["reset"]["optimizer"]["state"]
    assert kept.keys() == before.keys()
    for key in reset:
        expected = m * (ratio * before[key]["momentum_buffer"]) + reset[key]["momentum_buffer"]
        torch.testing.assert_close(kept[key]["momentum_buffer"], expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(kept[key]["momentum_buffer"], reset[key]["momentum_buffer"])
    assert len(reset) == len(list(new_model().parameters())) - 4  # conv1, conv2 frozen in phase 2
    # conv2 (trained in phase 1, frozen in phase 2) keeps its velocity untouched:
    # no update decays it; Caffe semantics only re-express it for the new lr.
    frozen_now = sorted(set(kept) - set(reset))
    assert len(frozen_now) == 2
    for key in frozen_now:
        torch.testing.assert_close(kept[key]["momentum_buffer"], ratio * before[key]["momentum_buffer"])


def test_enter_phase_keeps_or_clears_buffers_and_loads_init_from(tmp_path, uninterrupted):
    _, _, ref_last = uninterrupted
    model = new_model(seed=5)
    optimizer = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=0.0)
    optimizer.load_state_dict(ref_last["optimizer"])
    params = list(model.parameters())
    before = [b.clone() for b in momentum_buffers(optimizer, params)]
    enter_phase(model, optimizer, TWO_PHASES[1], starting=True)
    assert len(before) > 0
    assert_states_equal(momentum_buffers(optimizer, params), before)
    enter_phase(model, optimizer, dataclasses.replace(TWO_PHASES[1], reset_momentum=True), starting=False)
    assert_states_equal(momentum_buffers(optimizer, params), before)  # a resumed phase does not reset again
    enter_phase(model, optimizer, dataclasses.replace(TWO_PHASES[1], reset_momentum=True), starting=True)
    assert momentum_buffers(optimizer, params) == []

    # init_from another run: weights, and the optimizer state only when asked.
    source = tmp_path / "source.pt"
    torch.save(ref_last, source)
    fresh = new_model(seed=6)
    opt = build_optimizer(fresh, lr=0.1, momentum=0.9, weight_decay=0.0)
    enter_phase(fresh, opt, PhaseConfig(init_from=str(source), init_optimizer=True), starting=True)
    assert_states_equal(fresh.state_dict(), ref_last["model"])
    assert_states_equal(opt.state_dict()["state"], ref_last["optimizer"]["state"])
    fresh = new_model(seed=6)
    opt = build_optimizer(fresh, lr=0.1, momentum=0.9, weight_decay=0.0)
    enter_phase(fresh, opt, PhaseConfig(init_from=str(source)), starting=True)
    assert_states_equal(fresh.state_dict(), ref_last["model"])
    assert momentum_buffers(opt, list(fresh.parameters())) == []
    weights_only = tmp_path / "final.pt"
    torch.save({"model": ref_last["model"]}, weights_only)
    with pytest.raises(UserError, match="weights only.*init_optimizer: false"):
        enter_phase(fresh, opt, PhaseConfig(init_from=str(weights_only), init_optimizer=True), starting=True)


def test_freezing_freezes_and_unfreezing_restores(tmp_path):
    model = new_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    phases = (PhaseConfig(name="frozen", iterations=3, frozen=("conv1", "conv2"), lr_start=0.05, lr_end=0.05),)
    run(tmp_path / "a", phases=phases, model=model)
    for name in ("conv1", "conv2"):
        for p_name, p in getattr(model.backbone, name).named_parameters():
            assert p.grad is None and not p.requires_grad
            assert torch.equal(p, initial[f"backbone.{name}.{p_name}"])
    for name in ("conv3", "conv5"):
        for p_name, p in getattr(model.backbone, name).named_parameters():
            assert p.grad is not None and not torch.equal(p, initial[f"backbone.{name}.{p_name}"])
    # No momentum buffer was ever made for the frozen groups.
    state = load_checkpoint(tmp_path / "a" / "last.pt")["optimizer"]["state"]
    assert len(state) == len(list(model.parameters())) - 4

    unfrozen = (phases[0], PhaseConfig(name="thawed", iterations=2, frozen=(), lr_start=0.05, lr_end=0.05))
    model = new_model()
    run(tmp_path / "b", phases=unfrozen, model=model)
    for p_name, p in model.backbone.conv1.named_parameters():
        assert p.requires_grad and p.grad is not None
        assert not torch.equal(p, initial[f"backbone.conv1.{p_name}"])


def test_dropout_switch_per_phase(tmp_path):
    model = new_model()
    phases = (PhaseConfig(name="nodrop", iterations=1, dropout=False, lr_start=0.01, lr_end=0.01),)
    run(tmp_path, phases=phases, model=model)
    assert model.dropout.p == 0.0
    run(tmp_path / "on", phases=(dataclasses.replace(phases[0], dropout=True),), model=model)
    assert model.dropout.p == 0.5


# ---------------------------------------------------------------- learning rate


def test_phase_lr_values_at_start_middle_and_end():
    phase = PhaseConfig(iterations=80000, lr_start=5e-3, lr_end=1e-4)
    assert phase_lr(phase, 0) == 5e-3
    assert phase_lr(phase, 79999) == 1e-4
    # Exponential: the geometric mean halfway (i / (n - 1) = 1/2 at i = (n - 1) / 2).
    odd = PhaseConfig(iterations=5, lr_start=1e-2, lr_end=1e-4)
    assert phase_lr(odd, 2) == pytest.approx(1e-3, rel=1e-12)
    assert phase_lr(odd, 1) / phase_lr(odd, 0) == pytest.approx(phase_lr(odd, 4) / phase_lr(odd, 3), rel=1e-12)
    assert phase_lr(PhaseConfig(iterations=1, lr_start=0.3, lr_end=0.1), 0) == 0.3


def test_loop_applies_the_lr_of_every_iteration(tmp_path):
    _, result, _ = run(tmp_path, log_every=1)
    lrs = [rec["lr"] for rec in result.history]
    expected = [phase_lr(TWO_PHASES[0], i) for i in range(5)] + [phase_lr(TWO_PHASES[1], i) for i in range(4)]
    assert lrs == expected
    assert (lrs[0], lrs[4], lrs[5], lrs[8]) == (0.05, 0.01, 0.02, 0.002)
    assert [rec["phase"] for rec in result.history] == [0.0] * 5 + [1.0] * 4


# ---------------------------------------------------------------- clipping, losses


class LinearLoss(nn.Module):
    """loss = w . c: the gradient of every image is c (targets), known exactly."""

    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def forward(self, image, proposals, targets):
        return {"lin": (self.w * targets["c"]).sum()}


def constant_gradient_sample(c: torch.Tensor):
    def get_sample(index, phase_index, rng):
        return TrainSample(image=torch.zeros(1, 3, 1, 1), proposals=torch.zeros(0, 4), targets={"c": c})
    return get_sample


@pytest.mark.parametrize("scale, clipped", [(100.0, True), (1.0, False)])
def test_gradient_clipping_over_the_minibatch_sum(tmp_path, scale, clipped):
    c = torch.tensor([3.0, -4.0, 12.0], dtype=torch.float64) * scale  # |c| = 13 * scale
    model = LinearLoss()
    phases = (PhaseConfig(name="one", iterations=1, lr_start=1.0, lr_end=1.0, momentum=0.0, weight_decay=0.0),)
    _, result, _ = run(tmp_path, phases=phases, model=model, get_sample=constant_gradient_sample(c),
                       clip_grad_norm=80.0, log_every=1)
    step = -model.w.detach()
    # Logged norm: the gradient summed over the 4 images, before clipping.
    assert result.history[0]["grad_norm"] == pytest.approx(4 * 13 * scale)
    if clipped:  # the sum is rescaled to norm 80, the update is its mean: 20
        assert step.norm().item() == pytest.approx(20.0, rel=1e-6)
        assert step.norm().item() <= 20.0
    else:
        assert step.norm().item() == pytest.approx(13 * scale, rel=1e-12)
    torch.testing.assert_close(step / step.norm(), c / c.norm())  # direction kept


class NaNAt(nn.Module):
    """TinyDetector whose cls loss is NaN for one image in phase 1."""

    def __init__(self, bad_index: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = TinyDetector()
        self.backbone = self.inner.backbone
        self.bad_index = bad_index

    def forward(self, image, proposals, targets):
        losses = self.inner(image, proposals, targets)
        if targets["index"] == self.bad_index and targets["phase"] == 1:
            losses["cls"] = losses["cls"] * float("nan")
        return losses


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    order = ImageOrder(seed=3, num_images=NUM_IMAGES)
    bad_position = 5 * 4 + 1  # iteration 5 (phase 'second', its iteration 0), second image
    bad_index = order.index(bad_position)
    assert order.index(bad_position - 1) != bad_index  # its first appearance in phase 1

    def indexed(index, phase_index, rng):
        sample = tiny_sample(index, phase_index, rng)
        return TrainSample(sample.image, sample.proposals, {**sample.targets, "index": index, "phase": phase_index})

    with pytest.raises(NonFiniteLossError) as err:
        run(tmp_path / "bad", model=NaNAt(bad_index), get_sample=indexed, checkpoint_every=2)
    message = str(err.value)
    assert "iteration 5 (phase 1 'second', its iteration 0" in message
    assert f"image {bad_index}, data position {bad_position}" in message
    assert "loss=nan, loss_cls=nan, loss_bbox=" in message
    assert f"last good checkpoint: {tmp_path / 'bad' / 'phase0_first.pt'} (iteration 5)" in message
    last = load_checkpoint(tmp_path / "bad" / "last.pt")
    assert last["iteration"] == 5
    run(tmp_path / "good", model=NaNAt(-1), get_sample=indexed, checkpoint_every=2, phases=(TWO_PHASES[0],))
    assert_states_equal(last["model"], load_checkpoint(tmp_path / "good" / "last.pt")["model"])


class InfiniteGradient(nn.Module):
    """Finite loss (0) with a NaN gradient: sqrt at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))

    def forward(self, image, proposals, targets):
        return {"root": torch.sqrt(self.w.abs()).sum()}


def test_non_finite_gradient_stops(tmp_path):
    phases = (PhaseConfig(name="only", iterations=2, lr_start=0.1, lr_end=0.1),)
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm \(nan\) at iteration 0 "
                                                 r"\(phase 0 'only'.*loss_root=0"):
        run(tmp_path, phases=phases, model=InfiniteGradient(),
            get_sample=constant_gradient_sample(torch.zeros(2)))
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs_and_learns_something(tmp_path, amp):
    model = new_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    phases = (PhaseConfig(name="amp", iterations=2, lr_start=0.05, lr_end=0.05),)
    _, result, _ = run(tmp_path, phases=phases, model=model, amp=amp, log_every=1)
    assert all(math.isfinite(rec["loss"]) for rec in result.history)
    assert not torch.equal(model.cls.weight, before["cls.weight"])
    if amp == "fp16":
        assert load_checkpoint(tmp_path / "last.pt")["scaler"]["scale"] > 0


# ---------------------------------------------------------------- images per update


def test_image_order_is_a_seeded_permutation_per_epoch():
    a = image_order(seed=1, epoch=0, num_images=50)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, image_order(seed=1, epoch=0, num_images=50))
    assert not np.array_equal(a, image_order(seed=2, epoch=0, num_images=50))
    assert not np.array_equal(a, image_order(seed=1, epoch=1, num_images=50))
    order = ImageOrder(seed=1, num_images=50)
    assert [order.index(p) for p in range(50, 100)] == image_order(seed=1, epoch=1, num_images=50).tolist()


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_n_workers_see_the_images_of_one_accumulating_worker(world_size):
    order = ImageOrder(seed=7, num_images=NUM_IMAGES)
    for iteration in range(6):
        single = step_positions(iteration=iteration, images_per_batch=4, rank=0, world_size=1)
        per_rank = [step_positions(iteration=iteration, images_per_batch=4, rank=r, world_size=world_size)
                    for r in range(world_size)]
        assert all(len(p) == 4 // world_size for p in per_rank)
        assert [q for p in per_rank for q in p] == list(single)  # same positions, disjoint, in order
        assert [order.index(q) for p in per_rank for q in p] == [order.index(q) for q in single]
    assert list(step_positions(iteration=2, images_per_batch=4, rank=1, world_size=2)) == [10, 11]


def test_config_rules():
    with pytest.raises(ValueError, match="unknown group"):
        PhaseConfig(frozen=("conv9",))
    with pytest.raises(ValueError, match="lr_end: expected a number > 0"):
        PhaseConfig(lr_end=0.0)
    with pytest.raises(ValueError, match="init_optimizer: true needs init_from"):
        PhaseConfig(init_optimizer=True)
    with pytest.raises(ValueError, match="names must differ"):
        TrainConfig(phases=(PhaseConfig(name="a"), PhaseConfig(name="a")))
    assert TrainConfig().images_per_batch == 4 and TrainConfig().clip_grad_norm == 80.0


# ---------------------------------------------------------------- momentum 0.9 -> 0.99 with lr / 10


class Quadratic(nn.Module):
    """0.5 * a * (w - t)^2 with a small curvature: the gradient barely changes over
    the run, so the steady-state step lr * g / (1 - m) can be read off directly."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, image, proposals, targets):
        return {"quad": 0.5 * 1e-3 * (self.w - 1000.0) ** 2}


@pytest.mark.parametrize("semantics", ["caffe", "pytorch"])
def test_momentum_099_with_lr_over_10_keeps_the_effective_step(tmp_path, semantics):
    phases = (PhaseConfig(name="m090", iterations=300, lr_start=1e-3, lr_end=1e-3, momentum=0.9, weight_decay=0.0),
              PhaseConfig(name="m099", iterations=600, lr_start=1e-4, lr_end=1e-4, momentum=0.99,
                          weight_decay=0.0))
    model = Quadratic()
    trajectory = [0.0]
    train(model=model, phases=phases, num_images=1, get_sample=constant_gradient_sample(torch.zeros(())), seed=0,
          save_checkpoint=lambda state, event: "memory", images_per_batch=1, clip_grad_norm=None,
          momentum_semantics=semantics, checkpoint_every=10_000, log_every=10_000,
          on_iteration=lambda i: trajectory.append(model.w.item()))
    steps = np.diff(trajectory)  # steps[i]: the move of update i
    g = 1e-3 * 1000.0  # the gradient, nearly constant (w moves < 1% of the way to t)
    assert steps[299] == pytest.approx(1e-3 * g / (1 - 0.9), rel=1e-2)  # steady state of phase 1
    assert steps[-1] == pytest.approx(1e-4 * g / (1 - 0.99), rel=1e-2)  # the same step in phase 2
    if semantics == "caffe":  # the velocity carries over: no jump at the switch
        assert steps[300] / steps[299] == pytest.approx(1.0, abs=2e-3)
    else:  # PyTorch's buffer is rescaled by the new lr: the step drops to ~0.109, then recovers
        assert steps[300] / steps[299] == pytest.approx(0.109, abs=2e-3)


# ---------------------------------------------------------------- training samples and the stage (tiny data set)


def test_training_sample_resizes_flips_and_maps_labels(tmp_path):
    from ion.data.split import DetectionSplit
    from ion.data.train_samples import training_sample

    split = DetectionSplit.load(write_tiny_split(tmp_path) / "data", "train")
    record = split.images[1]
    proposals = np.array([[4.0, 6.0, 20.0, 30.0]], dtype=np.float32)
    settings = dict(categories=split.categories, min_size=24, max_size=100, pixel_mean=(0.5, 0.5, 0.5),
                    pixel_std=(0.25, 0.25, 0.25), with_masks=True)
    plain = training_sample(record, proposals, flip=False, **settings)
    flipped = training_sample(record, proposals, flip=True, **settings)
    assert plain.image.shape == (1, 3, 24, 32)  # shorter side 48 -> 24: scale 0.5
    torch.testing.assert_close(plain.proposals, torch.tensor([[2.0, 3.0, 10.0, 15.0]]))
    torch.testing.assert_close(plain.targets["boxes"], torch.tensor([[6.0, 5.0, 16.0, 13.0]]))
    assert plain.targets["labels"].tolist() == [2] and plain.targets["iscrowd"].tolist() == [True]  # id 7
    assert plain.targets["masks"].shape == (1, 24, 32) and plain.targets["masks"][0, 8, 10]
    torch.testing.assert_close(flipped.image, plain.image.flip(-1))
    torch.testing.assert_close(flipped.proposals, torch.tensor([[22.0, 3.0, 30.0, 15.0]]))  # x -> 32 - x
    assert torch.equal(flipped.targets["masks"], plain.targets["masks"].flip(-1))
