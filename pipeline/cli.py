"""The command line: `python -m pipeline run | plan | status | gc | predict | ablations | config-docs`,
one module per command in pipeline/commands/ (each with `add_parser` and `run`).

A `UserError` prints `error: <message>` on stderr and exits with status 2, no
traceback; Ctrl-C exits with 130, SIGTERM with 143, both at a safe point with the
MLflow runs marked KILLED. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Sequence

from ion.errors import UserError
from pipeline.commands import ablations, config_docs, gc, plan, predict, run, status
from pipeline.execution.disk_errors import disk_error
from pipeline.execution.session import ReportedError
from pipeline.execution.stopping import StopSignals

EXIT_USER_ERROR = 2
EXIT_SIGNAL_BASE = 128  # the shell's convention: 130 after SIGINT, 143 after SIGTERM
EXIT_INTERRUPTED = EXIT_SIGNAL_BASE + signal.SIGINT
COMMANDS = (run, plan, status, gc, predict, ablations, config_docs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="The ION COCO challenge pipeline: data -> proposals -> train -> detect -> tune -> evaluate.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    handler = {command.NAME: command.run for command in COMMANDS}[args.command]
    # SIGTERM (a scheduler, `kill`) ends a command like Ctrl-C does: at a safe point, the
    # MLflow runs marked KILLED, Ray shut down (pipeline/execution/stopping.py).
    args.stops = StopSignals()
    args.stops.install()
    try:
        return handler(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ReportedError:
        return EXIT_USER_ERROR
    except Exception as err:
        disk = disk_error(err, getattr(args, "workdir", None) or Path.cwd())  # a full or read-only disk
        if disk is None:
            raise
        print(f"error: {disk}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", None) or args.stops.signum or signal.SIGINT
        where = f" ({err})" if str(err) else ""
        print(f"interrupted{where}: finished stage outputs and checkpoints are kept; rerun the same command "
              "to continue", file=sys.stderr)
        return EXIT_SIGNAL_BASE + signum
    finally:
        args.stops.uninstall()
