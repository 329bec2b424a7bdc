"""The smoke pipeline, run once per test session: every stage of
configs/smoke.yaml in-process, through the runner, with a real MLflow tracker
and a local Ray, as `python -m pipeline run --stages all` does it
(pipeline/cli.py), with smaller proposal shards (SMOKE_IMAGES_PER_SHARD). The
stage tests read its artifact directories and never write into them: a test
that changes files works on a copy.
"""
from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

import stages.proposals as proposals_stage
from pipeline.cluster.tasks import shutdown_ray
from pipeline.config import PROJECT_ROOT, Config, load_config
from pipeline.graph import registered_stages
from pipeline.runner import RunReport, run_stages
from pipeline.tracking.client import Tracker, tracking_uri_for

SMOKE_CONFIG = PROJECT_ROOT / "configs" / "smoke.yaml"
# The smoke splits hold 8-16 images, fewer than one shard of the stage's default
# size (32): smaller shards give every split several, so the resume test can
# delete one shard and see that only that one is recomputed. The shard size
# changes how the work is cut, not what is produced.
SMOKE_IMAGES_PER_SHARD = 4


@dataclass(frozen=True)
class SmokeRun:
    """The finished smoke pipeline: its config, workdir, and each stage's artifact directory."""

    cfg: Config
    workdir: Path
    dirs: dict[str, Path]  # stage name -> <workdir>/artifacts/<stage>/<key>
    report: RunReport
    images_per_shard: int


class FakeContext:
    """A StageContext that maps sequentially in-process and records every map call."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.runtime = None
        self.maps: list[tuple[object, list]] = []  # (fn, items) of each ctx.map call
        self.metrics: list[tuple[dict, int | None]] = []
        self.models: list[dict] = []  # artifacts of each log_model call

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))

    def log_params(self, params):
        pass

    def graceful_stop(self):
        return contextlib.nullcontext(lambda: False)

    def map(self, fn, items, desc, gpu=False):
        items = list(items)
        self.maps.append((fn, items))
        return [fn(item) for item in items]

    def progress(self, iterable, desc, total=None, unit="items"):
        return iterable

    def log_model(self, artifacts):
        self.models.append(dict(artifacts))

    def link_to_model(self, path, relative):
        pass

    def train_placement(self, workers=None):
        return False, False  # one CPU process, as RunContext for train_workers 1 on the CPU


def copy_artifact(source: Path, parent: Path) -> Path:
    """A copy of an artifact directory under `parent`, keeping its name (the stage key:
    stages record it, e.g. as a store's config_key)."""
    target = parent / source.name
    shutil.copytree(source, target)
    return target


def run_smoke(tmp_path_factory) -> Iterator[SmokeRun]:
    """The session's `smoke_run` fixture (tests/conftest.py: shared by every test folder)."""
    workdir = tmp_path_factory.mktemp("smoke")
    with pytest.MonkeyPatch.context() as patch:
        # The tests' MLflow runs and Ray stay in the test's workdir and on this machine.
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("RAY_ADDRESS", raising=False)
        patch.setattr(proposals_stage, "IMAGES_PER_SHARD", SMOKE_IMAGES_PER_SHARD)
        cfg = load_config(SMOKE_CONFIG, workdir=workdir)
        stages = registered_stages()
        tracker = Tracker(tracking_uri=tracking_uri_for(workdir), experiment=cfg.name, workdir=workdir,
                          config_file=SMOKE_CONFIG)
        # The runner's Cluster starts Ray on the first map and shuts it down at the end (also on failure).
        report = run_stages(cfg, stages=stages, selected=stages, tracker=tracker,
                            command=f"python -m pipeline run --config {SMOKE_CONFIG} --workdir {workdir}",
                            run_name="all")
    yield SmokeRun(cfg=cfg, workdir=workdir, dirs={o.name: o.path for o in report.outcomes}, report=report,
                   images_per_shard=SMOKE_IMAGES_PER_SHARD)
    shutdown_ray()  # a no-op unless something in the session left a Ray instance running
