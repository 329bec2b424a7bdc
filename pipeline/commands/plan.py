"""`python -m pipeline plan`: check every input the selected stages read and estimate each stage's
time, disk and memory before a run (pipeline/plan/); exit 2 when the run would stop."""
from __future__ import annotations

import argparse
from typing import Any

from ion.errors import UserError
from pipeline.commands.flags import config_flags, load, rerun_command
from pipeline.config import DEFAULT_CONFIG, config_path
from pipeline.graph import registered_names, registered_stages, select_names, select_stages

NAME = "plan"


def add_parser(commands: Any) -> None:
    sub = commands.add_parser(NAME, help="check every input and estimate each stage's time, disk and memory "
                                         "before a run (exit 2 when the run would stop)")
    sub.add_argument("--stages", default="all", help="all, or a comma list such as detect,tune (default: all)")
    sub.add_argument("--force", action="store_true", help="plan as if the selected stages were not cached")
    sub.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    sub.add_argument("--calibrate", action="store_true",
                     help="first measure the stages that have no calibration on this device kind: run them on "
                          "two small samples of the config (pipeline/plan/calibrate.py); cached afterwards")
    sub.add_argument("--sample-images", type=int, default=None, metavar="N",
                     help="with --calibrate: images per split of the smaller sample, the larger has 2N "
                          "(default: 8)")
    config_flags(sub)


def run(args: argparse.Namespace) -> int:
    if args.sample_images is not None and (args.sample_images < 1 or not args.calibrate):
        raise UserError(f"--sample-images {args.sample_images}: give a count >= 1, together with --calibrate")
    select_names(registered_names(), args.stages)
    cfg = load(args)
    stages = registered_stages()
    selected = select_stages(stages, args.stages)
    from pipeline.plan.calibrate import SAMPLE_IMAGES
    from pipeline.plan.command import run_plan
    from pipeline.runner import check_upstream

    sample = args.sample_images or SAMPLE_IMAGES

    def upstream(*, keys, store):
        check_upstream(stages, selected, keys, store, force=args.force, command=rerun_command(args))

    def calibrate(*, cached, materials, device):
        from pipeline.plan.calibrate import calibrate as run_calibration

        return run_calibration(cfg, stages=stages, selected=[s.name for s in selected], cached=cached,
                               materials=materials, device=device, quiet_stdout=args.json,
                               sizes=(sample, 2 * sample))

    return run_plan(cfg, stages=stages, selected=selected, as_json=args.json, force=args.force,
                    config_file=config_path(args.config or DEFAULT_CONFIG), argv=args.argv,
                    check_upstream_fn=upstream, calibrate_fn=calibrate if args.calibrate else None)
