"""The version of the code a run used: the git commit of the project checkout
(with `-dirty` when tracked files differ from it), else the installed package's
version. Tagged on every MLflow run (pipeline/tracking/client.py)."""
from __future__ import annotations

import functools
import importlib.metadata
import subprocess

from pipeline import PROJECT_ROOT

DISTRIBUTION = "ion-pipeline"
GIT_TIMEOUT_S = 5.0


def _git(*words: str) -> str | None:
    try:
        done = subprocess.run(["git", *words], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`git:<commit>[-dirty]`, `ion-pipeline <version>`, or `unknown`."""
    commit = _git("rev-parse", "HEAD")
    if commit:
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return f"git:{commit}{'-dirty' if dirty else ''}"
    try:
        return f"{DISTRIBUTION} {importlib.metadata.version(DISTRIBUTION)}"
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
