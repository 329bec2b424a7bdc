"""`python -m pipeline plan --calibrate`: measure what a config costs on this cluster's own devices
before its first run, by running it on a sample.

The calibration run is the user's config cut down (data.sample_images images per split, a few
training iterations per phase, a few RPN iterations, a trial or a few) run by `python -m pipeline
run` in a process of its own, as a user's run is (the same Ray cluster and devices, its start-up
and memory, its progress lines and log), twice, at SAMPLE_IMAGES and twice as many, so that
each stage's fit (pipeline/plan/estimate.py) separates a fixed part (starting Ray, building the
model) from a per-item part. Only the fields that count work are cut:
they are not part of the calibration key, so what the sample measures is filed under the full
config's key; a cut that would change a key is left out (the sample then runs that part in full).

The sample has its own workdir, <workdir>/calibration/sample/ (its artifacts, its log, its stages'
records), and its own MLflow experiment, ion-<name>-calibration, in the workdir's store. Only
when both runs have finished are their records added to <workdir>/calibration/ (each marked
"origin": "sample"); a stopped or failed sample leaves the calibration as it was, and its finished
stage outputs make the rerun resume. Once every stage to run has records, `plan --calibrate` runs
nothing ("calibration: cached").
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

from pipeline.plan.estimate import CALIBRATION_DIR, Calibration, calibration_key, format_seconds

SAMPLE_DIR = "sample"  # under <workdir>/calibration/: the calibration run's workdir
SAMPLE_IMAGES = 8  # images per split of the smaller sample; the larger has twice as many
RPN_ITERATIONS = 4  # the RPN's training iterations in either sample
SUFFIX = "-calibration"  # of the sample's config name: its MLflow experiment and registered model
ORIGIN_SAMPLE = "sample"
CALIBRATE_COST = (f"two short runs of the pipeline, on {SAMPLE_IMAGES} and {2 * SAMPLE_IMAGES} images per split with "
                  f"a few iterations of each training phase: a few minutes plus twice the model's start-up")


def sample_dir(workdir: Path) -> Path:
    return Path(workdir) / CALIBRATION_DIR / SAMPLE_DIR


def _phases(cfg: Any, images: int) -> Any:
    # About half as many iterations per phase as sample images: a few minibatches of every phase
    # (each may freeze other layers, so each is measured), and more of them in the larger sample.
    cap = max(1, images // 2)
    phases = tuple(dataclasses.replace(p, iterations=min(p.iterations, cap)) for p in cfg.train.phases)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, phases=phases))


def _rpn(cfg: Any, images: int) -> Any:
    # The same few iterations in both samples: the RPN's checkpoints are then the fixed part of the
    # proposals stage's disk, not read as growth with the images (a VGG16 RPN checkpoint is ~200 MB),
    # and its training is timed on its own (pipeline/plan/work.py) whatever the count.
    rpn = cfg.proposals.rpn
    return dataclasses.replace(cfg, proposals=dataclasses.replace(
        cfg.proposals, rpn=dataclasses.replace(rpn, iterations=min(rpn.iterations, RPN_ITERATIONS))))


def _trials(cfg: Any, images: int) -> Any:
    # A trial every 4 sample images (at least one): the two samples differ in trials as well as in
    # candidates, whose count the barely trained sample models do not keep in step with the images.
    trials = min(cfg.tune.trials, max(1, images // 4))
    return dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, trials=trials))


# The work counts a sample cuts, each with what it cuts: applied only where no calibration key changes.
CUTS: tuple[tuple[str, Callable[[Any, int], Any]], ...] = (
    ("train.phases[*].iterations", _phases),
    ("proposals.rpn.iterations", _rpn),
    ("tune.trials", _trials),
)


def _keys(cfg: Any, materials: Mapping[str, tuple[str, dict]], names: Sequence[str], device: str) -> dict:
    return {name: calibration_key(name, cfg, materials[name][1], device) for name in names
            if hasattr(cfg, name)}


def sample_config(cfg: Any, images: int, *, materials: Mapping[str, tuple[str, dict]], device: str
                  ) -> tuple[Any, list[str], list[str]]:
    """(the sample's config, the cuts applied, the cuts left out because they would change a
    calibration key) for `images` per split."""
    workdir = sample_dir(Path(cfg.runtime.workdir))
    sample = dataclasses.replace(
        cfg, name=cfg.name + SUFFIX, registered_model=cfg.registered_model and cfg.registered_model + SUFFIX,
        data=dataclasses.replace(cfg.data, sample_images=images),
        runtime=dataclasses.replace(cfg.runtime, workdir=str(workdir)))
    wanted = _keys(cfg, materials, list(materials), device)
    applied, left = [], []
    for label, cut in CUTS:
        trial = cut(sample, images)
        if _keys(trial, materials, list(materials), device) == wanted:
            sample = trial
            applied.append(label)
        else:
            left.append(label)
    return sample, applied, left


def origins(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many records came from the on-demand sample and how many from this workdir's runs."""
    found = {"sample": 0, "runs": 0}
    for r in records:
        found["sample" if r.get("origin") == ORIGIN_SAMPLE else "runs"] += 1
    return {k: v for k, v in found.items() if v}


def missing_stages(cfg: Any, *, selected: Sequence[str], cached: Mapping[str, bool],
                   materials: Mapping[str, tuple[str, dict]], device: str) -> list[str]:
    """The selected stages that would run and have no calibration record for this code, config and device."""
    calibration = Calibration(Path(cfg.runtime.workdir))
    return [name for name in selected if not cached[name] and hasattr(cfg, name)
            and not calibration.records(name, calibration_key(name, cfg, materials[name][1], device))]


def _with_upstream(stages: Sequence[Any], names: Sequence[str]) -> list[Any]:
    by_name, needed, todo = {s.name: s for s in stages}, set(), list(names)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(by_name[name].upstream)
    return [s for s in stages if s.name in needed]


def _run_sample(sample: Any, *, to_run: Sequence[Any], tracking_uri: str, images: int, out: TextIO) -> float:
    """One calibration run: `python -m pipeline run` on the sample's config in a process of its own,
    as a user's run is (its start-up, its memory), its lines passed on to `out`; its seconds."""
    from ion.atomic import write_bytes_atomic
    from ion.schema import to_yaml
    from pipeline.config import PROJECT_ROOT
    from pipeline.execution.session import ReportedError
    from pipeline.tracking.uri import TRACKING_URI_ENV

    workdir = Path(sample.runtime.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"config-{images}.yaml"
    write_bytes_atomic(config, to_yaml(sample).encode("utf-8"))
    command = [sys.executable, "-m", "pipeline", "run", "--config", str(config), "--workdir", str(workdir),
               "--stages", ",".join(s.name for s in to_run)]
    print(f"calibration run: {images} images per split: {shlex.join(['python', *command[1:]])}", file=out,
          flush=True)
    # The user's MLflow store (the sample's own experiment, ion-<name>-calibration), the same Ray
    # cluster, and this very code (its fingerprint is part of the calibration key).
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, TRACKING_URI_ENV: tracking_uri, "PYTHONPATH": path}
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        for line in proc.stdout:
            out.write(line)
            out.flush()
        code = proc.wait()
    except KeyboardInterrupt as err:  # SIGTERM or Ctrl-C: the run stops at its safe point, as `run` does
        proc.send_signal(getattr(err, "signum", None) or signal.SIGINT)
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    if code != 0:
        # Exit 2 has said why in one line (stderr); anything else is named here.
        if code != 2:
            print(f"error: the calibration run exited with status {code} (its log: {workdir / 'logs'}); "
                  f"nothing was added to the calibration", file=sys.stderr)
        raise ReportedError(f"calibration run exited with status {code}")
    return time.perf_counter() - started


def calibrate(cfg: Any, *, stages: Sequence[Any], selected: Sequence[str], cached: Mapping[str, bool],
              materials: Mapping[str, tuple[str, dict]], device: str, quiet_stdout: bool = False,
              sizes: Sequence[int] = (SAMPLE_IMAGES, 2 * SAMPLE_IMAGES)) -> list[str]:
    """Run the sample for the selected stages with no records (nothing when every one has some)
    and add its records to the calibration. Returns the note lines for the plan."""
    from pipeline.tracking.uri import tracking_uri_for

    workdir = Path(cfg.runtime.workdir)
    calibration = Calibration(workdir)
    missing = missing_stages(cfg, selected=selected, cached=cached, materials=materials, device=device)
    measured = [n for n in selected if not cached[n] and n not in missing and hasattr(cfg, n)]
    if not missing:
        return [f"calibration: cached (records for {', '.join(measured) or 'no stage to run'} on {device} in "
                f"{calibration.dir}); nothing to run"]
    to_run = _with_upstream(stages, missing)
    out = sys.stderr if quiet_stdout else sys.stdout  # --json: stdout holds the plan's JSON alone
    samples = [sample_config(cfg, images, materials=materials, device=device) for images in sizes]
    _, applied, left = samples[0]
    print(f"calibration: no records for {', '.join(missing)} on {device}: running "
          f"{','.join(s.name for s in to_run)} on samples of {' and '.join(map(str, sizes))} images per split "
          f"(data.sample_images; cut: {', '.join(applied) or 'nothing else'}"
          f"{'; in full: ' + ', '.join(left) if left else ''}) in {sample_dir(workdir)}", file=out, flush=True)
    seconds = 0.0
    for images, (sample, _, _) in zip(sizes, samples):
        seconds += _run_sample(sample, to_run=to_run, tracking_uri=tracking_uri_for(workdir), images=images,
                               out=out)
    added = _merge(cfg, [s for s, _, _ in samples], names=[s.name for s in to_run], materials=materials,
                   device=device)
    # The sample's outputs (checkpoints of the configured model) served their purpose: its records stay.
    shutil.rmtree(sample_dir(workdir) / "artifacts", ignore_errors=True)
    return [f"calibration: measured {', '.join(f'{n} ({k} records)' for n, k in added.items())} on {device} by "
            f"the sample runs in {format_seconds(seconds)} (log: {sample_dir(workdir) / 'logs'})"]


def _merge(cfg: Any, samples: Sequence[Any], *, names: Sequence[str], materials: Mapping[str, tuple[str, dict]],
           device: str) -> dict[str, int]:
    """Each stage's sample records, filed under the full config's key; {stage: records added}."""
    target = Calibration(Path(cfg.runtime.workdir))
    source = Calibration(Path(samples[0].runtime.workdir))
    added: dict[str, int] = {}
    for name in names:
        key = calibration_key(name, cfg, materials[name][1], device)
        keys = {calibration_key(name, s, materials[name][1], device) for s in samples}
        if keys != {key}:
            continue  # cannot happen: sample_config keeps only cuts that leave the keys as they are
        for record in source.records(name, key):
            target.add(name, key, {k: v for k, v in record.items() if k != "recorded_at"} | {"origin": ORIGIN_SAMPLE})
            added[name] = added.get(name, 0) + 1
    return added
