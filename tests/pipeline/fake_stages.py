"""Fake stages and a fake config for the orchestration tests.

Three stages `one -> two -> three` that do real (tiny) file work, so the tests
can check caching, keys, manifests, resuming and locking without the real
detector. Behaviour switches (fail, die, gate) come from environment variables,
not the config, so they do not change the cache keys.
"""
from __future__ import annotations

import json
import os
import signal
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipeline.graph import build_graph
from stages.contract import RuntimeConfig, StageResult

FAIL_ENV = "FAKE_STAGE_FAIL"  # name of a stage that raises
DIE_ENV = "FAKE_STAGE_DIE"  # name of a stage that kills its process after its first piece
GATE_ENV = "FAKE_STAGE_GATE"  # a file stage `one` waits for before it goes on (concurrency test)
GATE_DEADLINE_S = 300  # far beyond any run here: only a hang reaches it
LOG_ENV = "FAKE_STAGE_LOG"  # a file every stage run appends "<stage> <pid>" to


@dataclass(frozen=True)
class Alpha:
    a: int = field(default=1, metadata={"help": "read by stage one", "min": 0})
    unread: str = field(default="x", metadata={"help": "read by no stage"})


@dataclass(frozen=True)
class Beta:
    b: float = field(default=0.5, metadata={"help": "read by stage two", "min": 0.0, "max": 1.0})
    label: Optional[str] = field(default=None, metadata={"help": "read by stage two"})


@dataclass(frozen=True)
class FakeConfig:
    name: str = field(default="fake", metadata={"help": "experiment"})
    registered_model: str = field(default="", metadata={"help": "Model Registry name (pipeline/tracking/registry.py)"})
    seed: int = field(default=0, metadata={"help": "seed", "min": 0})
    alpha: Alpha = field(default_factory=Alpha, metadata={"help": "section a"})
    beta: Beta = field(default_factory=Beta, metadata={"help": "section b"})
    gamma: Alpha = field(default_factory=Alpha, metadata={"help": "a section no stage reads"})
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig, metadata={"help": "runtime"})


def _log(stage: str) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{stage} {os.getpid()}\n")


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value), encoding="utf-8")
    os.replace(tmp, path)


def run_one(cfg, inputs, out, ctx):
    """Writes two pieces (resumable: a piece already there is kept) and a plot."""
    _log("one")
    gate = os.environ.get(GATE_ENV)
    deadline = time.monotonic() + GATE_DEADLINE_S
    while gate and not os.path.exists(gate):
        if time.monotonic() > deadline:  # a test that never opens the gate fails instead of hanging
            raise TimeoutError(f"{gate} did not appear within {GATE_DEADLINE_S} s")
        time.sleep(0.01)
    resumed = []
    for piece in range(2):
        path = out / f"piece{piece}.json"
        if path.exists():
            resumed.append(piece)
            continue
        _write_json(path, {"value": cfg.alpha.a * 10 + piece, "seed": cfg.seed})
        ctx.log_metrics({"piece": float(piece)}, step=piece)
        if os.environ.get(DIE_ENV) == "one":
            os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(FAIL_ENV) == "one":
        raise RuntimeError("stage one failed on purpose")
    (out / "plots").mkdir(exist_ok=True)
    (out / "plots" / "curve.png").write_bytes(b"\x89PNG fake")
    _write_json(out / "resumed.json", resumed)
    return StageResult(metrics={"a_times_ten": cfg.alpha.a * 10.0}, summary=[f"one wrote 2 pieces, resumed {resumed}"])


def run_two(cfg, inputs, out, ctx):
    _log("two")
    if os.environ.get(FAIL_ENV) == "two":
        raise RuntimeError("stage two failed on purpose")
    first = json.loads((inputs["one"] / "piece0.json").read_text())["value"]
    ctx.log_params({"extra": {"note": "from two"}})
    _write_json(out / "two.json", {"value": first + cfg.beta.b, "label": cfg.beta.label})
    return StageResult(metrics={"two_value": first + cfg.beta.b}, summary=[])


def run_three(cfg, inputs, out, ctx):
    _log("three")
    value = json.loads((inputs["two"] / "two.json").read_text())["value"]
    _write_json(out / "three.json", {"value": value * 2})
    return StageResult(metrics={"three_value": value * 2}, summary=["three doubled it"])


def _module(name: str, reads: tuple, upstream: tuple, run) -> types.ModuleType:
    module = types.ModuleType(f"fake_stages.{name}")
    module.NAME, module.VERSION, module.READS, module.UPSTREAM, module.run = name, "1", reads, upstream, run
    return module


def modules(version_of_two: str = "1") -> list[types.ModuleType]:
    two = _module("two", ("beta",), ("one",), run_two)
    two.VERSION = version_of_two
    return [_module("one", ("seed", "alpha"), (), run_one), two, _module("three", (), ("two",), run_three)]


def stages(version_of_two: str = "1"):
    return build_graph(modules(version_of_two))


def square(x: int) -> int:
    """A Ray task body (module-level so workers import it by name)."""
    time.sleep(0.01 * (x % 3))  # finish out of order
    return x * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x


def user_error_on_two(x: int) -> int:
    from ion.errors import UserError

    if x == 2:
        raise UserError("images/2.jpg: cannot decode the image (remove it from the split)")
    return x


class Payload:
    """A large task result whose life the driver can watch (weakref)."""

    def __init__(self, index: int, size: int) -> None:
        self.index = index
        self.data = bytes(size)


def payload(x: int) -> Payload:
    time.sleep(0.01 * (x % 3))  # finish out of order
    return Payload(x, 256 * 1024)  # above Ray's 100 KiB inline limit: kept in the object store


def env_of(name: str) -> str | None:
    return os.environ.get(name)


def run_map(cfg, inputs, out, ctx):
    """A stage that maps through ctx (the Ray path of the runner)."""
    squares = ctx.map(square, list(range(6)), desc="squares")
    _write_json(out / "squares.json", squares)
    return StageResult(metrics={"sum": float(sum(squares))}, summary=[])


def map_modules() -> list[types.ModuleType]:
    return [_module("mapper", ("alpha",), (), run_map)]


def config(workdir: Path, **changes) -> FakeConfig:
    return FakeConfig(runtime=RuntimeConfig(workdir=str(workdir)), **changes)


def run(cfg: FakeConfig, spec: str = "all", *, force: bool = False):
    """Run the fake pipeline with its own tracker (as a separate invocation would); the RunReport."""
    from pipeline.graph import select_stages
    from pipeline.runner import run_stages
    from pipeline.tracking.client import Tracker, tracking_uri_for

    graph = stages()
    workdir = Path(cfg.runtime.workdir)
    tracker = Tracker(tracking_uri=tracking_uri_for(workdir), experiment=cfg.name, workdir=workdir)
    return run_stages(cfg, stages=graph, selected=select_stages(graph, spec), tracker=tracker, force=force)


def run_fake(workdir: Path) -> dict[str, bool]:
    """All fake stages for the default config in `workdir`: {stage: cached} (a thread or process target)."""
    return {o.name: o.cached for o in run(config(workdir)).outcomes}
