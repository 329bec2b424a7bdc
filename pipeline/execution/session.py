"""The one code path of every command that runs stages or reads their outputs
(`run`, `ablations`, `predict`): the progress setting checked before any work,
the run log, the tracking server probed before the first stage, and user errors
printed inside the log. The CLI (pipeline/cli.py) installs the SIGTERM/SIGINT
handling (pipeline/execution/stopping.py) for every command and hands it here, so
every stage runs with the graceful-stop hooks.

    with stage_session(workdir, headline="config ... | stages ...", stops=args.stops) as session:
        report = session.run_stages(cfg, stages=..., selected=..., experiment=cfg.name, ...)
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from ion.errors import UserError
from pipeline.execution.disk_errors import disk_error
from pipeline.execution.run_log import RunLog
from pipeline.execution.stopping import NO_SIGNALS, StopSignals


class ReportedError(Exception):
    """A UserError already printed (inside the run log): the CLI exits 2 without printing it again."""


class StageSession:
    """The run log and stop signals of one command; runs stages with a tracker per experiment."""

    def __init__(self, workdir: Path, log: RunLog, stops: StopSignals) -> None:
        self.workdir = Path(workdir)
        self.log = log
        self.stops = stops

    @property
    def tracking_uri(self) -> str:
        from pipeline.tracking.uri import tracking_uri_for

        return tracking_uri_for(self.workdir)

    def tracker(self, experiment: str, config_file: Path | None = None) -> Any:
        from pipeline.tracking.client import Tracker

        return Tracker(tracking_uri=self.tracking_uri, experiment=experiment, workdir=self.workdir,
                       config_file=config_file)

    def run_stages(self, cfg: Any, *, stages: Sequence[Any], selected: Sequence[Any], experiment: str,
                   config_file: Path | None, command: str, run_name: str, tags: dict[str, str],
                   force: bool = False) -> Any:
        """pipeline/runner.py's run_stages with this session's tracker and stop signals."""
        from pipeline.runner import run_stages

        return run_stages(cfg, stages=stages, selected=selected, tracker=self.tracker(experiment, config_file),
                          force=force, command=command, run_name=run_name, tags=tags, stops=self.stops)


@contextlib.contextmanager
def stage_session(workdir: Path, *, headline: str, stops: StopSignals = NO_SIGNALS,
                  probe_tracking: bool = True) -> Iterator[StageSession]:
    """Within: stdout, stderr and logging tee into <workdir>/logs/; a UserError is
    printed there and re-raised as ReportedError. `probe_tracking`: check the
    tracking server answers before yielding (commands that log to MLflow)."""
    from pipeline.execution.progress import print_every

    print_every()  # a bad ION_PROGRESS_EVERY fails before any work
    with RunLog(workdir) as log:
        print(headline, flush=True)
        print(f"log: {log.path}", flush=True)
        try:
            session = StageSession(workdir, log, stops)
            if probe_tracking:
                session.tracker("").check_reachable()
            yield session
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise ReportedError(str(err)) from None
        except Exception as err:
            disk = disk_error(err, workdir)  # a full or read-only disk: one line, not a traceback
            if disk is None:
                raise
            print(f"error: {disk}", file=sys.stderr)
            raise ReportedError(str(disk)) from None
