"""A full disk, done for real: the workdir on a size-limited tmpfs (these machines run as root;
where mounting is not allowed the test is skipped), filled by a training run; then the same
command on the enlarged filesystem resumes."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from pipeline.cache.store import MANIFEST
from tests.faults.conftest import assert_ok, assert_one_error_line, run, stage_results
from tests.helpers import tmpfs

HEADROOM_MB = 2  # less than one training checkpoint of the smoke model (~2.5 MB)


def _resize(path: Path, megabytes: int) -> None:
    done = subprocess.run(["mount", "-o", f"remount,size={megabytes}m", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_full_disk_is_one_line_then_the_same_command_resumes(shared_run, tmp_path):
    with tmpfs(tmp_path / "disk", 200) as disk:
        workdir = shared_run.copy(disk / "work")
        used = shutil.disk_usage(disk).used
        _resize(disk, used // (1 << 20) + HEADROOM_MB)
        args = ("--stages", "train", "-o", "train.phases[1].iterations=6")  # a new train key: it trains
        full = run(workdir, *args)
        assert_one_error_line(full, f"{disk}/", ": no space left on device (", " MB free)",
                              "rerun the same command")
        assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]  # nothing half-written left
        trained = [p for p in (workdir / "artifacts" / "train").iterdir()
                   if p.is_dir() and p.name != shared_run.artifact("train").name]
        assert all(not (p / MANIFEST).exists() for p in trained)  # and nothing half-written trusted

        _resize(disk, 400)
        rerun = run(workdir, *args)
        assert_ok(rerun)
        assert stage_results(rerun.stdout) == {"train": "ran"}

        done = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        read_only = run(workdir, "--stages", "train", "--force")
        assert_one_error_line(read_only, f"{disk}/", ": read-only file system (", "MB free)", "writable")
