"""Damaged or interrupted stage outputs: never used, recomputed, same result."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest

from tests.faults.conftest import assert_ok, assert_one_error_line, finish, run, stage_results, start


def test_torn_study_journal_is_repaired_on_rerun(shared_run, tmp_path):
    workdir = shared_run.copy(tmp_path)
    shutil.copytree(shared_run.workdir / "calibration", workdir / "calibration")
    tune = workdir / "artifacts" / "tune" / shared_run.artifact("tune").name
    (tune / "manifest.json").unlink()  # the run that was writing the journal was killed: no manifest
    journal = tune / "study.journal"
    journal.write_bytes(journal.read_bytes()[:-9])  # its last record cut short

    proc = run(workdir, "--stages", "tune")
    assert_ok(proc)
    assert "dropped a torn last record" in proc.stdout
    # The estimate the stage started with counts detect's candidates; the run that calibrated it did
    # the same work, so it predicts that run's time and keeps the prediction in the manifest.
    start_line = [line for line in proc.stdout.splitlines() if line.startswith("estimate: tune: ")]
    assert len(start_line) == 1 and " candidates)" in start_line[0] and "assumed" not in start_line[0]
    timings = json.loads((tune / "manifest.json").read_text())["timings"]
    reference = json.loads((shared_run.artifact("tune") / "manifest.json").read_text())["timings"]
    assert timings["predicted_s"] == pytest.approx(reference["run_s"], rel=1e-3)
    assert json.loads((tune / "best.json").read_text()) == json.loads(
        (shared_run.artifact("tune") / "best.json").read_text())


def test_emptied_cached_output_is_never_used_and_is_recomputed(shared_run, tmp_path):
    workdir = shared_run.copy(tmp_path)
    tune = workdir / "artifacts" / "tune" / shared_run.artifact("tune").name
    (tune / "best.json").write_text("")

    forced = run(workdir, "--stages", "evaluate", "--force")
    assert_one_error_line(forced, "stage 'evaluate' needs the output of 'tune'", "--stages tune,evaluate")
    assert f"damaged: {tune / 'best.json'}" in forced.stderr

    rerun = run(workdir, "--stages", "all")
    assert_ok(rerun)
    assert stage_results(rerun.stdout)["tune"] == "ran"
    assert json.loads((tune / "best.json").read_text()) == json.loads(
        (shared_run.artifact("tune") / "best.json").read_text())
    again = run(workdir, "--stages", "all")
    assert_ok(again)
    assert set(stage_results(again.stdout).values()) == {"cached"}


def _study(path):
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    study = optuna.load_study(study_name="nms-voting", storage=storage)
    return [(t.number, t.params, t.value) for t in study.get_trials(deepcopy=False)]


def test_tune_killed_mid_study_ends_as_the_uninterrupted_study(shared_run, tmp_path):
    args = ("--stages", "tune", "-o", "tune.trials=24")
    whole = shared_run.copy(tmp_path / "whole")
    uninterrupted = start(whole, *args)  # goes on beside the run that is killed and resumed

    killed = shared_run.copy(tmp_path / "killed")
    proc = start(killed, *args)
    tune_dir = killed / "artifacts" / "tune"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        journals = [p for p in tune_dir.glob("*/study.journal") if p.parent.name != shared_run.artifact("tune").name]
        if journals and journals[0].read_bytes().count(b'"op_code":6') >= 8:  # 8 trials' states set
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert_ok(run(killed, *args))
    assert_ok(finish(uninterrupted))

    (whole_dir,) = [p for p in (whole / "artifacts" / "tune").iterdir() if (p / "manifest.json").is_file()
                    and p.name != shared_run.artifact("tune").name]
    resumed_dir = tune_dir / whole_dir.name
    assert json.loads((resumed_dir / "best.json").read_text()) == json.loads((whole_dir / "best.json").read_text())
    assert _study(resumed_dir / "study.journal") == _study(whole_dir / "study.journal")
