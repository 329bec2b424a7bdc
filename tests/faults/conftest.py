"""The fault-injection suite: each test does to a real `python -m pipeline run`
on the smoke config what a user or the machine might (two runs started
together, SIGTERM, a dead tracking server, torn or emptied files, bad
annotations and images, a NaN loss) and checks the command ends in success or
in exit 2 with one `error:` line and no traceback, and that a rerun succeeds.

One smoke pipeline is run per session, by two commands started together on a
fresh workdir (that is itself the first fault); the tests work on copies of its
artifacts, each with its own MLflow store, and never write into it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import PROJECT_ROOT

SMOKE = ["--config", "smoke"]
RUN_TIMEOUT_S = 900  # a whole smoke pipeline on a loaded 2-core machine


def pipeline_env(**extra: str) -> dict[str, str]:
    """The environment of a pipeline command: this checkout first on the path, local MLflow and Ray."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def command(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", *SMOKE, "--workdir", str(workdir), *args]


def start(workdir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(command(workdir, *args), cwd=PROJECT_ROOT, env=env or pipeline_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for a command from `start`."""
    stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run(workdir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(workdir, *args), cwd=PROJECT_ROOT, env=env or pipeline_env(),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, exactly one `error:` line on stderr, no traceback; the line holds every fragment."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def stage_results(stdout: str) -> dict[str, str]:
    """{stage: "ran" | "cached"} from the end summary."""
    names = ("data", "proposals", "train", "detect", "tune", "evaluate")
    found = {}
    for line in stdout.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in names and words[1] in ("ran", "cached"):
            found[words[0]] = words[1]
    return found


@dataclass(frozen=True)
class SharedRun:
    workdir: Path
    together: list[subprocess.CompletedProcess]  # the two commands started together on the fresh workdir
    third: subprocess.CompletedProcess  # the same command once they were done
    empty_store: Path  # a migrated MLflow sqlite store without runs

    def artifact(self, stage: str) -> Path:
        found = [p for p in (self.workdir / "artifacts" / stage).iterdir() if (p / "manifest.json").is_file()]
        assert len(found) == 1, found
        return found[0]

    def copy(self, target: Path) -> Path:
        """A workdir holding a copy of the finished artifacts and an empty MLflow store
        (creating one takes seconds of migrations; the fresh-workdir case is the two
        commands started together)."""
        shutil.copytree(self.workdir / "artifacts", target / "artifacts",
                        ignore=shutil.ignore_patterns("*.lock"))
        shutil.copy(self.empty_store, target / "mlflow.db")
        return target


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory, mlflow_db_template) -> SharedRun:
    workdir = tmp_path_factory.mktemp("faults") / "work"
    procs = [start(workdir), start(workdir)]
    together = [finish(proc) for proc in procs]
    third = run(workdir) if all(p.returncode == 0 for p in together) else together[0]
    return SharedRun(workdir=workdir, together=together, third=third, empty_store=mlflow_db_template)
