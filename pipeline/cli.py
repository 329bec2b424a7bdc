"""The command line: `python -m pipeline run | plan | status | gc | predict | ablations | config-docs`.

A `UserError` prints `error: <message>` on stderr and exits with status 2, no
traceback; Ctrl-C exits with 130, SIGTERM with 143, both at a safe point with the
MLflow runs marked KILLED. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from typing import Sequence

from ion.errors import UserError
from pipeline.config import DEFAULT_CONFIG, config_path, config_reference, load_config
from pipeline.graph import registered_names, registered_stages, select_names, select_stages
from ion.schema import display_path
from pipeline.status import format_status, stage_statuses
from pipeline.stopping import StopSignals
from pipeline.store import ArtifactStore

EXIT_USER_ERROR = 2
EXIT_SIGNAL_BASE = 128  # the shell's convention: 130 after SIGINT, 143 after SIGTERM
EXIT_INTERRUPTED = EXIT_SIGNAL_BASE + signal.SIGINT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="The ION COCO challenge pipeline: data -> proposals -> train -> detect -> tune -> evaluate.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def config_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--config", type=Path, default=None,
                         help="YAML config file, or the name of a shipped one (smoke, coco_ion, ...); default: default")
        sub.add_argument("-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override one config value, e.g. -o train.phases[0].lr_start=0.01 (repeatable)")
        sub.add_argument("--workdir", type=Path, default=None,
                         help="directory for artifacts and mlflow.db (overrides runtime.workdir)")

    run = commands.add_parser("run", help="run stages, reusing cached outputs")
    run.add_argument("--stages", default="all", help="all, or a comma list such as detect,tune (default: all)")
    run.add_argument("--force", action="store_true", help="recompute the selected stages even when cached")
    config_flags(run)
    plan = commands.add_parser("plan", help="check every input and estimate each stage's time, disk and memory "
                                            "before a run (exit 2 when the run would stop)")
    plan.add_argument("--stages", default="all", help="all, or a comma list such as detect,tune (default: all)")
    plan.add_argument("--force", action="store_true", help="plan as if the selected stages were not cached")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    config_flags(plan)
    status = commands.add_parser("status", help="what is cached, stale or missing for a config")
    status.add_argument("--verify", action="store_true", help="also re-checksum every cached output")
    config_flags(status)
    gc = commands.add_parser(
        "gc", help="list (and with --yes delete) stage outputs that no given config uses",
        description="Lists every output under <workdir>/artifacts whose key is not the current key of its stage "
                    "for any of the given configs (default: the default config only; give --config once per "
                    "config whose outputs you want to keep). --yes deletes them.")
    gc.add_argument("--config", dest="configs", type=Path, action="append", default=None, metavar="CONFIG",
                    help="a config whose current outputs are kept (repeatable; default: default)")
    gc.add_argument("-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config value in every --config (repeatable)")
    gc.add_argument("--workdir", type=Path, default=None,
                    help="directory for artifacts (overrides runtime.workdir of the first config)")
    gc.add_argument("--yes", action="store_true", help="delete the listed outputs")
    from pipeline.predict_command import add_predict_parser
    add_predict_parser(commands, config_flags)
    ablations = commands.add_parser("ablations", help="run every ablation config, then tabulate their test AP "
                                                      "(pipeline/ablations.py)")
    ablations.add_argument("--configs", nargs="+", type=Path, default=None, metavar="YAML",
                           help="ablation configs (default: configs/ablations/*.yaml of the project, sorted)")
    ablations.add_argument("--reference", default=None, metavar="VARIANT",
                           help="the variant the others are compared with (default: irnn-identity if "
                                "present, else the first)")
    ablations.add_argument("--stages", default="all", help="all, or a comma list (default: all)")
    ablations.add_argument("--tables", default=None, metavar="N,N",
                           help="only the configs whose ablation.table is one of these paper tables "
                                "(e.g. 5,9), and the reference (default: every config)")
    ablations.add_argument("-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override one config value in every variant (repeatable)")
    ablations.add_argument("--workdir", type=Path, default=None,
                           help="directory for artifacts, mlflow.db and the table (overrides runtime.workdir)")
    commands.add_parser("config-docs", help="print the config reference (Markdown)")
    return parser


def _load(args: argparse.Namespace):
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


def _rerun_command(args: argparse.Namespace) -> str:
    """The user's invocation without --stages/--force."""
    return run_command(None if args.config is None else str(args.config), args.overrides, args.workdir)


def _cmd_run(args: argparse.Namespace) -> int:
    select_names(registered_names(), args.stages)  # a typo fails before anything heavy is imported
    cfg = _load(args)
    stages = registered_stages()
    selected = select_stages(stages, args.stages)
    # mlflow and ray take seconds to import: only `run` needs them, and only once
    # the config and the stage selection are known to be good.
    from pipeline.runner import format_summary, run_stages
    from pipeline.tracking import Tracker, tracking_uri_for

    from pipeline.progress import print_every
    from pipeline.run_log import RunLog

    print_every()  # a bad ION_PROGRESS_EVERY fails before any work
    workdir = Path(cfg.runtime.workdir)
    with RunLog(workdir) as log:
        print(f"config {display_path(config_path(args.config or DEFAULT_CONFIG))} | workdir {workdir} | "
              f"stages {','.join(s.name for s in selected)}{' (--force)' if args.force else ''}", flush=True)
        print(f"log: {log.path}", flush=True)
        tracker = Tracker(tracking_uri=tracking_uri_for(workdir), experiment=cfg.name, workdir=workdir,
                          config_file=config_path(args.config or DEFAULT_CONFIG))
        try:
            tracker.check_reachable()
            report = run_stages(cfg, stages=stages, selected=selected, tracker=tracker, force=args.force,
                                command=_rerun_command(args), run_name=args.stages,
                                tags={"command": shlex.join(["python", "-m", "pipeline", *args.argv])},
                                stops=args.stops)
        except UserError as err:  # printed here too, so the log holds it
            print(f"error: {err}", file=sys.stderr)
            raise _Reported(err) from None
        print()
        print(format_summary(report))
        print(f"log:     {log.path}")
    return 0


class _Reported(Exception):
    """A UserError already printed (inside the run log)."""


def _cmd_plan(args: argparse.Namespace) -> int:
    select_names(registered_names(), args.stages)
    cfg = _load(args)
    stages = registered_stages()
    selected = select_stages(stages, args.stages)
    from pipeline.plan.command import run_plan
    from pipeline.runner import check_upstream

    def upstream(*, keys, store):
        check_upstream(stages, selected, keys, store, force=args.force, command=_rerun_command(args))

    return run_plan(cfg, stages=stages, selected=selected, as_json=args.json, force=args.force,
                    config_file=config_path(args.config or DEFAULT_CONFIG), argv=args.argv,
                    check_upstream_fn=upstream)


def _cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args)
    store = ArtifactStore(Path(cfg.runtime.workdir))
    print(format_status(stage_statuses(registered_stages(), cfg, store, verify=args.verify), store))
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    from pipeline.gc import delete_output, format_unused, unused_outputs

    configs = [load_config(c, args.overrides, workdir=args.workdir) for c in (args.configs or [DEFAULT_CONFIG])]
    store = ArtifactStore(Path(configs[0].runtime.workdir))
    items = unused_outputs(registered_stages(), configs, store)
    print(f"workdir: {store.workdir}")
    deleted = [delete_output(item) for item in items] if args.yes else None
    print(format_unused(items, deleted=deleted))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.predict_command import run_predict

    return run_predict(args, _load(args))


def _cmd_ablations(args: argparse.Namespace) -> int:
    from pipeline.ablations import run_ablations

    run_ablations(configs=args.configs, overrides=args.overrides, workdir=args.workdir, stages_spec=args.stages,
                  reference=args.reference, argv=args.argv, tables=args.tables)
    return 0


def _cmd_config_docs(args: argparse.Namespace) -> int:
    print(config_reference())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    handlers = {"run": _cmd_run, "plan": _cmd_plan, "status": _cmd_status, "gc": _cmd_gc, "predict": _cmd_predict,
                "ablations": _cmd_ablations,
                "config-docs": _cmd_config_docs}
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    # SIGTERM (a scheduler, `kill`) ends a run like Ctrl-C does: at a safe point, the
    # MLflow runs marked KILLED, Ray shut down (pipeline/stopping.py).
    args.stops = StopSignals()
    args.stops.install()
    try:
        return handlers[args.command](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except _Reported:
        return EXIT_USER_ERROR
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", None) or args.stops.signum or signal.SIGINT
        where = f" ({err})" if str(err) else ""
        print(f"interrupted{where}: finished stage outputs and checkpoints are kept; rerun the same command "
              "to continue", file=sys.stderr)
        return EXIT_SIGNAL_BASE + signum
    finally:
        args.stops.uninstall()
