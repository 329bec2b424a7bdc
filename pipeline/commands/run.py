"""`python -m pipeline run`: run stages, reusing cached outputs."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ion.schema import display_path
from pipeline.commands.flags import config_flags, invocation, load, rerun_command
from pipeline.config import DEFAULT_CONFIG, config_path
from pipeline.graph import registered_names, registered_stages, select_names, select_stages

NAME = "run"


def add_parser(commands: Any) -> None:
    sub = commands.add_parser(NAME, help="run stages, reusing cached outputs")
    sub.add_argument("--stages", default="all", help="all, or a comma list such as detect,tune (default: all)")
    sub.add_argument("--force", action="store_true", help="recompute the selected stages even when cached")
    config_flags(sub)


def run(args: argparse.Namespace) -> int:
    select_names(registered_names(), args.stages)  # a typo fails before anything heavy is imported
    cfg = load(args)
    stages = registered_stages()
    selected = select_stages(stages, args.stages)
    # mlflow and ray take seconds to import: only once the config and the stage
    # selection are known to be good.
    from pipeline.execution.session import stage_session
    from pipeline.runner import format_summary

    workdir = Path(cfg.runtime.workdir)
    config_file = config_path(args.config or DEFAULT_CONFIG)
    headline = (f"config {display_path(config_file)} | workdir {workdir} | "
                f"stages {','.join(s.name for s in selected)}{' (--force)' if args.force else ''}")
    with stage_session(workdir, headline=headline, stops=args.stops) as session:
        report = session.run_stages(cfg, stages=stages, selected=selected, experiment=cfg.name,
                                    config_file=config_file, force=args.force, command=rerun_command(args),
                                    run_name=args.stages, tags={"command": invocation(args.argv)})
        print()
        print(format_summary(report))
        print(f"log:     {session.log.path}")
    return 0
