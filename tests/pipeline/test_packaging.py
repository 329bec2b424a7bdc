"""A non-editable install (what `pip install .` puts in site-packages) runs from
any directory: it ships the configs, finds the default config, accepts a
shipped config by name, and has the console script."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project built and installed (no dependencies: the test's own
    environment has them) into a folder that stands for site-packages."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    # A copy of what the build reads, so it writes nothing into the checkout.
    for name in ("pipeline", "stages", "proposals", "ion", "configs", "pyproject.toml", "README.md"):
        subprocess.run(["cp", "-r", str(ROOT / name), str(build)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(build)], check=True, capture_output=True)
    return target


def _run(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_installed_package_ships_the_configs(installed):
    shipped = sorted(p.relative_to(installed / "configs").as_posix() for p in (installed / "configs").rglob("*.yaml"))
    in_tree = sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
    assert shipped == in_tree and "default.yaml" in shipped


def test_status_from_another_directory_uses_the_packaged_default(installed, tmp_path):
    done = _run(installed, tmp_path, sys.executable, "-m", "pipeline", "status")
    assert done.returncode == 0, done.stderr
    # The shipped config's ../workdir means ./workdir of the directory the user runs in.
    assert done.stdout.splitlines()[0] == f"workdir: {tmp_path / 'workdir'}"
    assert "data" in done.stdout and "missing" in done.stdout


def test_a_shipped_config_is_named_without_its_path(installed, tmp_path):
    done = _run(installed, tmp_path, sys.executable, "-m", "pipeline", "status", "--config", "smoke")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"workdir: {tmp_path / 'workdir' / 'smoke'}"
    wrong = _run(installed, tmp_path, sys.executable, "-m", "pipeline", "status", "--config", "smok")
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: smok: no such config file")
    assert "smoke" in wrong.stderr and "Traceback" not in wrong.stderr


def test_console_script_is_installed(installed, tmp_path):
    script = installed / "bin" / "ion-pipeline"
    assert script.is_file()
    done = _run(installed, tmp_path, sys.executable, str(script), "status", "--config", "smoke")
    assert done.returncode == 0, done.stderr
