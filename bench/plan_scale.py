"""`pipeline plan` proven at growing scale: calibrate on small COCO-sized trees, predict bigger ones
before running them, run them, and tabulate predicted against measured time, disk and peak RSS.

    python -m bench.plan_scale --trees /tmp/trees --workdir /tmp/scale-work \
        --calibrate 0.001,0.0025 --predict 0.005,0.01 [-o KEY=VALUE ...]

Trees are written by bench/coco_scale.py to <trees>/tree_<scale> when missing. Every run shares the
workdir, so the calibration (<workdir>/calibration/) collects the small runs; each prediction is made
with `plan --json` before its own run adds to it. --table-only re-reads the saved plans and the
runs' manifests. The -o flags go to every plan and run (e.g. fewer tune trials).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.coco_scale import config_overrides, generate

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG = "coco_scale"
FIGURES = (("seconds", "run_s", "time s"), ("disk_bytes", "disk_bytes", "disk MB"),
           ("peak_rss_bytes", "peak_rss_bytes", "peak RSS MB"))


def _flags(trees: Path, scale: float, workdir: Path, extra: list[str]) -> list[str]:
    flags = ["--config", CONFIG, "--workdir", str(workdir)]
    for o in [*extra, *config_overrides(trees / f"tree_{scale:g}")]:
        flags += ["-o", o]
    return flags


def _pipeline(args: list[str], log: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    with open(log, "w") as f:
        return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=PROJECT_ROOT, env=env,
                              stdout=f, stderr=subprocess.STDOUT).returncode


def measured(trees: Path, scale: float, workdir: Path, extra: list[str]) -> dict[str, dict]:
    """The manifest timings of every stage of the run at `scale`."""
    from pipeline.cache.store import ArtifactStore
    from pipeline.config import load_config
    from pipeline.graph import cache_keys, registered_stages

    overrides = [*extra, *config_overrides(trees / f"tree_{scale:g}")]
    cfg = load_config(CONFIG, overrides, workdir=workdir)
    store = ArtifactStore(workdir)
    return {name: (store.manifest(name, key) or {}).get("timings", {})
            for name, key in cache_keys(registered_stages(), cfg).items()}


def recalibrate(trees: Path, scales: list[float], workdir: Path, extra: list[str]) -> None:
    """Rebuild the calibration from the runs' outputs at `scales` (after a change of its keys)."""
    from pipeline.cache.store import ArtifactStore
    from pipeline.config import load_config
    from pipeline.graph import registered_stages
    from pipeline.plan.observe import record_outputs

    for scale in scales:
        cfg = load_config(CONFIG, [*extra, *config_overrides(trees / f"tree_{scale:g}")], workdir=workdir)
        print(f"recalibrated from {scale:g}: {record_outputs(cfg, registered_stages(), ArtifactStore(workdir))}")


def _cell(p: float | None, m: float | None, div: float) -> str:
    if p is None or m is None:
        return "-"
    return f"{p / div:.1f} ({100 * (p - m) / max(m, 1e-9):+.0f}%)"


def table(trees: Path, workdir: Path, scales: list[float], extra: list[str]) -> str:
    """Per scale and stage: the plan made before any of the big runs, the estimate the stage started
    with (its inputs counted: split sizes, detect's candidates), and what it measured."""
    lines = ["| scale | stage | items | " + " | ".join(f"{t}: plan / at start / measured" for *_, t in FIGURES)
             + " |", "|---|---|---:|" + "---|" * len(FIGURES)]
    for scale in scales:
        plan = json.loads((workdir / f"plan_{scale:g}.json").read_text())
        runs = measured(trees, scale, workdir, extra)
        for name, stage in plan["stages"].items():
            cells = []
            for key, timing, _ in FIGURES:
                div = 1.0 if key == "seconds" else 1e6
                m = runs.get(name, {}).get(timing)
                at_start = runs.get(name, {}).get("predicted_s" if key == "seconds" else f"predicted_{key}")
                cells.append(f"{_cell(stage.get(key), m, div)} / {_cell(at_start, m, div)} / "
                             + ("-" if m is None else f"{m / div:.1f}"))
            lines.append(f"| {scale:g} | {name} | {stage['items']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--calibrate", default="0.001,0.0025")
    parser.add_argument("--predict", default="0.005,0.01")
    parser.add_argument("-o", dest="overrides", action="append", default=[])
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--recalibrate", action="store_true", help="only rebuild the calibration from the "
                        "outputs of the --calibrate runs")
    args = parser.parse_args(argv)
    small = [float(s) for s in args.calibrate.split(",") if s]
    big = [float(s) for s in args.predict.split(",") if s]
    if args.recalibrate:
        recalibrate(args.trees, small, args.workdir, args.overrides)
        return 0
    if not args.table_only:
        args.workdir.mkdir(parents=True, exist_ok=True)
        for scale in small + big:
            if not (args.trees / f"tree_{scale:g}").is_dir():
                generate(args.trees / f"tree_{scale:g}", scale=scale, seed=0)
        for scale in small:
            rc = _pipeline(["run", *_flags(args.trees, scale, args.workdir, args.overrides)],
                           args.workdir / f"run_{scale:g}.log")
            print(f"calibration run at {scale:g}: exit {rc}", flush=True)
        for scale in big:  # every prediction before any of the runs it predicts
            with open(args.workdir / f"plan_{scale:g}.json", "w") as f:
                subprocess.run([sys.executable, "-m", "pipeline", "plan", "--json",
                                *_flags(args.trees, scale, args.workdir, args.overrides)], cwd=PROJECT_ROOT,
                               env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, stdout=f)
        for scale in big:
            rc = _pipeline(["run", *_flags(args.trees, scale, args.workdir, args.overrides)],
                           args.workdir / f"run_{scale:g}.log")
            print(f"run at {scale:g}: exit {rc}", flush=True)
    print(table(args.trees, args.workdir, big, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
