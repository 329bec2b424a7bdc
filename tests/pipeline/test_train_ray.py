"""The training loop under Ray Train (pipeline/cluster/train.py): 2 CPU workers
(gloo) against 1 process with accumulation, and a worker that dies mid-run."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ion.engine.checkpoint import CheckpointFiles, load_checkpoint
from ion.engine.loop import train
from pipeline.cluster.tasks import init_ray, shutdown_ray
from pipeline.cluster.train import TrainerSetup, run_trainer
from stages.contract import RuntimeConfig
from stages.train_config import PhaseConfig
from tests.helpers import NUM_IMAGES, TinyDetector, tiny_sample

PHASES = (
    PhaseConfig(name="first", iterations=4, frozen=("conv1",), lr_start=0.05, lr_end=0.01),
    PhaseConfig(name="second", iterations=3, frozen=(), lr_start=0.02, lr_end=0.002, momentum=0.99),
)
SETTINGS = dict(seed=3, images_per_batch=4, checkpoint_every=2, log_every=2)


def tiny_worker(session, *, fail_at_position=None, marker=None):
    """The stage's worker in miniature: build, resume if Ray has a checkpoint, train.
    With `fail_at_position`, rank 1 dies there the first time (the marker file
    remembers that it did)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyDetector()
    get_sample = tiny_sample
    if fail_at_position is not None and session.rank == 1 and not Path(marker).exists():
        def get_sample(index, phase_index, rng):
            if rng.bit_generator.state == _generator_state(fail_at_position):
                Path(marker).write_text("died once")
                raise RuntimeError(f"worker died at data position {fail_at_position}")
            return tiny_sample(index, phase_index, rng)
    result = train(model=model, phases=PHASES, num_images=NUM_IMAGES, get_sample=get_sample,
                   save_checkpoint=session.save, resume=session.resume_state(), device=session.device,
                   rank=session.rank, world_size=session.world_size, **SETTINGS)
    return {"iterations": result.iterations, "started_at": result.start_iteration}


def _generator_state(position):
    from ion.engine.schedule import sample_rng
    return sample_rng(seed=SETTINGS["seed"], position=position).bit_generator.state


@pytest.fixture(scope="module")
def ray_cluster():
    started = init_ray(RuntimeConfig(num_workers=4))
    yield
    if started:
        shutdown_ray()


@pytest.fixture(scope="module")
def dying_run(ray_cluster, tmp_path_factory):
    """One Ray Train run (a run costs tens of seconds): 2 CPU workers, rank 1 dies
    inside iteration 5's accumulation (positions 20-23; rank 1 holds 22 and 23)
    on the first attempt; FailureConfig allows one restart."""
    directory = tmp_path_factory.mktemp("ray")
    marker = directory / "died"
    setup = TrainerSetup(num_workers=2, use_gpu=False, storage_dir=directory / "storage", name="dies",
                         max_failures=1, keep_checkpoints=len(PHASES) + 1)
    outcome = run_trainer(tiny_worker, {"fail_at_position": 5 * 4 + 3, "marker": str(marker)}, setup)
    return outcome, marker, directory


def test_killed_worker_is_retried_and_resumes_from_the_last_checkpoint(dying_run):
    outcome, marker, _ = dying_run
    assert marker.read_text() == "died once"
    # The restarted group resumed from the last checkpoint, written after update 4
    # (the end of phase 'first'; checkpoint_every=2 wrote none after update 5), not from scratch.
    assert outcome.return_value == {"iterations": 7, "started_at": 4}
    # Ray Train kept both phase ends and the newest rolling checkpoint (keep = phases + 1).
    assert [(c.iteration, c.phase_end, c.phase_name) for c in outcome.checkpoints] == [
        (4, True, "first"), (6, False, "second"), (7, True, "second")]
    assert outcome.latest.iteration == 7


def test_two_workers_after_a_failure_match_one_uninterrupted_process(dying_run, tmp_path):
    """DDP sums the same images' gradients as one process accumulating them, in
    another order: equal to float rounding; any resume error would be far larger."""
    outcome, _, directory = dying_run
    torch.manual_seed(0)
    model = TinyDetector()
    result = train(model=model, phases=PHASES, num_images=NUM_IMAGES, get_sample=tiny_sample,
                   save_checkpoint=CheckpointFiles(tmp_path), **SETTINGS)
    ray_state = load_checkpoint(outcome.latest.copy_to(directory / "latest.pt"))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ray_state["model"][key], value, rtol=0, atol=1e-6)
    local_optimizer = load_checkpoint(tmp_path / "last.pt")["optimizer"]
    for key, entry in local_optimizer["state"].items():
        torch.testing.assert_close(ray_state["optimizer"]["state"][key]["momentum_buffer"],
                                   entry["momentum_buffer"], rtol=0, atol=1e-5)
    torch.manual_seed(0)
    assert not torch.equal(ray_state["model"]["cls.weight"], TinyDetector().cls.weight)  # it trained
    # The logged losses agree too (summed over both workers' images).
    losses = [rec["loss"] for rec in ray_state["history"]]
    assert losses == pytest.approx([rec["loss"] for rec in result.history], rel=1e-5)


def user_error_worker(session, *, attempts: str):
    """A worker whose input is bad (a wrong init_from, say): every attempt would fail alike."""
    from ion.errors import UserError

    with open(attempts, "a", encoding="utf-8") as f:
        f.write(f"{session.rank}\n")
    raise UserError("train.phases[0].init_from: /nowhere.pt: no such file (fix the path)")


def test_user_error_in_a_worker_is_not_retried(ray_cluster, tmp_path):
    from ion.errors import UserError

    attempts = tmp_path / "attempts"
    setup = TrainerSetup(num_workers=2, use_gpu=False, storage_dir=tmp_path / "storage", name="bad",
                         max_failures=2, keep_checkpoints=1)
    with pytest.raises(UserError, match="init_from: /nowhere.pt: no such file"):
        run_trainer(user_error_worker, {"attempts": str(attempts)}, setup)
    assert sorted(attempts.read_text().split()) == ["0", "1"]  # one attempt per worker, no retries
