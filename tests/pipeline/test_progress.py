"""pipeline/execution/progress.py: full lines in a pipe (every update with
ION_PROGRESS_EVERY=0, first and last otherwise), a bad setting is a user error,
and the run log tees what is printed."""
from __future__ import annotations

import io
import logging
import sys

import pytest

from ion.errors import UserError
from pipeline.execution.progress import Progress, iterate, print_every
from pipeline.execution.run_log import RunLog


def _captured(monkeypatch) -> io.StringIO:
    out = io.StringIO()  # not a TTY: a pipe
    monkeypatch.setattr(sys, "stdout", out)
    return out


def test_every_update_prints_a_done_total_line_when_the_interval_is_zero(monkeypatch):
    monkeypatch.setenv("ION_PROGRESS_EVERY", "0")
    out = _captured(monkeypatch)
    assert list(iterate(range(3), "work", unit="images")) == [0, 1, 2]
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["work: 1/3", "work: 2/3", "work: 3/3", "work: 3/3"]
    assert all("images/s, ETA" in line for line in lines)
    assert lines[-1].endswith("| 3 images in 0s")


def test_a_long_interval_prints_the_first_and_the_last_line(monkeypatch):
    monkeypatch.setenv("ION_PROGRESS_EVERY", "3600")
    out = _captured(monkeypatch)
    with Progress("train", total=100, unit="it", also=("images", 4)) as bar:
        for _ in range(100):
            bar.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("train: 1/100 (1%)") and "images/s" in lines[0]
    assert lines[1].startswith("train: 100/100 (100%)")


@pytest.mark.parametrize("value", ["soon", "-1"])
def test_a_bad_interval_is_a_user_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("ION_PROGRESS_EVERY", value)
    with pytest.raises(UserError, match="ION_PROGRESS_EVERY"):
        print_every()


def test_run_log_holds_stdout_stderr_and_logging(tmp_path, monkeypatch):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    with RunLog(tmp_path) as log:
        print("printed")
        print("complained", file=sys.stderr)
        logging.getLogger("some.library").info("logged")
    text = log.path.read_text()
    assert log.path.parent == tmp_path.resolve() / "logs" and log.path.name.startswith("run-")
    assert "printed" in text and "complained" in text and "some.library: logged" in text
    assert out.getvalue() == "printed\n" and err.getvalue() == "complained\n"
    assert sys.stdout is out and sys.stderr is err
