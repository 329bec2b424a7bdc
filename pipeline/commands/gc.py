"""`python -m pipeline gc`: list (and with --yes delete) stage outputs that no given config uses."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.cache.store import ArtifactStore
from pipeline.config import DEFAULT_CONFIG, load_config
from pipeline.graph import registered_stages

NAME = "gc"


def add_parser(commands: Any) -> None:
    sub = commands.add_parser(
        NAME, help="list (and with --yes delete) stage outputs that no given config uses",
        description="Lists every output under <workdir>/artifacts whose key is not the current key of its stage "
                    "for any of the given configs (default: the default config only; give --config once per "
                    "config whose outputs you want to keep). --yes deletes them.")
    sub.add_argument("--config", dest="configs", type=Path, action="append", default=None, metavar="CONFIG",
                     help="a config whose current outputs are kept (repeatable; default: default)")
    sub.add_argument("-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config value in every --config (repeatable)")
    sub.add_argument("--workdir", type=Path, default=None,
                     help="directory for artifacts (overrides runtime.workdir of the first config)")
    sub.add_argument("--yes", action="store_true", help="delete the listed outputs")


def run(args: argparse.Namespace) -> int:
    from pipeline.cache.gc import delete_output, format_unused, unused_outputs

    configs = [load_config(c, args.overrides, workdir=args.workdir) for c in (args.configs or [DEFAULT_CONFIG])]
    store = ArtifactStore(Path(configs[0].runtime.workdir))
    items = unused_outputs(registered_stages(), configs, store)
    print(f"workdir: {store.workdir}")
    deleted = [delete_output(item, store) for item in items] if args.yes else None
    print(format_unused(items, deleted=deleted))
    return 0
