"""`python -m pipeline status`: what is cached, stale or missing for a config."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.cache.status import format_status, stage_statuses
from pipeline.cache.store import ArtifactStore
from pipeline.commands.flags import config_flags, load
from pipeline.graph import registered_stages

NAME = "status"


def add_parser(commands: Any) -> None:
    sub = commands.add_parser(NAME, help="what is cached, stale or missing for a config")
    sub.add_argument("--verify", action="store_true", help="also re-checksum every cached output")
    config_flags(sub)


def run(args: argparse.Namespace) -> int:
    cfg = load(args)
    store = ArtifactStore(Path(cfg.runtime.workdir))
    print(format_status(stage_statuses(registered_stages(), cfg, store, verify=args.verify), store))
    return 0
