"""What the config-reading commands share: the --config/-o/--workdir flags, the
config they load, and the one `python -m pipeline run ...` command that messages
suggest to rerun."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Sequence

from pipeline.config import DEFAULT_CONFIG, Config, load_config


def config_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--config", type=Path, default=None,
                     help="YAML config file, or the name of a shipped one (smoke, coco_ion, ...); default: default")
    sub.add_argument("-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config value, e.g. -o train.phases[0].lr_start=0.01 (repeatable)")
    sub.add_argument("--workdir", type=Path, default=None,
                     help="directory for artifacts and mlflow.db (overrides runtime.workdir)")


def load(args: argparse.Namespace) -> Config:
    return load_config(args.config or DEFAULT_CONFIG, args.overrides, workdir=args.workdir)


def run_command(config: str | None, overrides: Sequence[str], workdir: Path | None) -> str:
    """`python -m pipeline run` with these flags and no --stages/--force: what
    messages suggest to run (a missing upstream stage, for one)."""
    words = ["python", "-m", "pipeline", "run"]
    if config is not None:
        words += ["--config", config]
    for text in overrides:
        words += ["-o", text]
    if workdir is not None:
        words += ["--workdir", str(workdir)]
    return shlex.join(words)


def rerun_command(args: argparse.Namespace) -> str:
    """The user's config flags as a `pipeline run` command (without --stages/--force)."""
    return run_command(None if args.config is None else str(args.config), args.overrides, args.workdir)


def invocation(argv: Sequence[str]) -> str:
    """The command line as typed (the MLflow runs' `command` tag)."""
    return shlex.join(["python", "-m", "pipeline", *argv])
