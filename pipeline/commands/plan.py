"""`python -m pipeline plan`: check every input the selected stages read and estimate each stage's
time, disk and memory before a run (pipeline/plan/); exit 2 when the run would stop."""
from __future__ import annotations

import argparse
from typing import Any

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
    config_flags(sub)


def run(args: argparse.Namespace) -> int:
    select_names(registered_names(), args.stages)
    cfg = load(args)
    stages = registered_stages()
    selected = select_stages(stages, args.stages)
    from pipeline.plan.command import run_plan
    from pipeline.runner import check_upstream

    def upstream(*, keys, store):
        check_upstream(stages, selected, keys, store, force=args.force, command=rerun_command(args))

    return run_plan(cfg, stages=stages, selected=selected, as_json=args.json, force=args.force,
                    config_file=config_path(args.config or DEFAULT_CONFIG), argv=args.argv,
                    check_upstream_fn=upstream)
