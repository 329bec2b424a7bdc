"""`python -m pipeline plan --calibrate`: a workdir with no calibration gets every stage's time,
disk and memory measured by two sample runs through the runner, filed under the full config's
keys; the second call finds them and runs nothing; a SIGTERM or a full disk during the sample
ends `plan` (143, or 2 with one line) with no record written."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

from pipeline.cli import main
from pipeline.config import PROJECT_ROOT
from pipeline.plan.calibrate import RPN_ITERATIONS, sample_dir
from pipeline.plan.estimate import CALIBRATION_DIR
from tests.helpers import tmpfs
from tests.pipeline.test_cli import cli

STAGES = ["data", "proposals", "train", "detect", "tune", "evaluate"]
SMOKE = ["--config", "configs/smoke.yaml"]


def _records(workdir) -> dict[str, list[dict]]:
    return {path.name.split("-")[0]: json.loads(path.read_text())["records"]
            for path in (workdir / CALIBRATION_DIR).glob("*.json")}


def test_calibrate_measures_every_stage_once_then_is_cached(workdir, capsys):
    from mlflow import MlflowClient

    assert main(["plan", *SMOKE, "--workdir", str(workdir), "--calibrate", "--sample-images", "2"]) == 0
    out = capsys.readouterr().out
    # The runner's own lines: both sample runs ran every stage.
    assert out.count("calibration run: ") == 2 and out.count("stage train: started") == 2
    assert f"calibration: no records for {', '.join(STAGES)} on cpu: running" in out
    estimate = out[out.index("estimate on cpu"):].splitlines()
    for name in STAGES:
        line = next(line for line in estimate if line.startswith(f"  {name}: "))
        assert ", ~" in line and " GPU-h, disk " in line and ", peak RSS " in line, line
        assert line.endswith("[from the calibration sample]"), line
    assert estimate[-1].startswith("total: ~") and "no calibration" not in "\n".join(estimate)
    records = _records(workdir)
    assert sorted(records) == sorted(STAGES)
    assert all(r["origin"] == "sample" for rs in records.values() for r in rs)
    # Two sizes where the sample cuts the work: images per split, training iterations (1 and 2 per phase).
    assert sorted(r["items"] for r in records["data"]) == [6, 12]
    assert sorted(r["items"] for r in records["train"]) == [2 * 2, 4 * 2]  # iterations x images_per_batch
    assert sorted(r["work"]["trial_images"] for r in records["tune"]) == [2, 4]  # 1 trial (1 per 4 images) x minival
    # The same RPN iterations in both samples (x its batch of 1): its checkpoints do not pass for growth.
    assert [r["work"]["rpn_images_seen"] for r in records["proposals"]] == [RPN_ITERATIONS] * 2
    assert not (sample_dir(workdir) / "artifacts").exists()  # its outputs are removed, its log is kept
    logs = sorted((sample_dir(workdir) / "logs").iterdir())
    assert len(logs) == 2
    # The sample's runs are filed in the workdir's store under an experiment of their own.
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    sample_runs = client.search_runs([client.get_experiment_by_name("ion-smoke-calibration").experiment_id])
    assert [r.info.run_name for r in sample_runs].count(f"smoke-calibration: {','.join(STAGES)}") == 2
    own_runs = client.search_runs([client.get_experiment_by_name("ion-smoke").experiment_id])
    assert {r.info.run_name for r in own_runs} == {"smoke: plan"}

    # The second call: the records are there, nothing runs.
    assert main(["plan", *SMOKE, "--workdir", str(workdir), "--calibrate", "--json"]) == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    assert (f"note: calibration: cached (records for {', '.join(STAGES)} on cpu in {workdir / CALIBRATION_DIR}); "
            f"nothing to run") in captured.err
    assert "calibration run: " not in captured.err
    assert sorted((sample_dir(workdir) / "logs").iterdir()) == logs
    assert _records(workdir) == records
    assert plan["problems"] == [] and plan["calibration"]["assumed"] == []
    for name in STAGES:
        source = plan["calibration"]["sources"][name]
        assert source["figures"] == "measured" and source["measured_from"] == {"sample": len(records[name])}
        assert plan["stages"][name]["seconds"] > 0 and plan["stages"][name]["disk_bytes"] > 0


def test_sigterm_during_the_sample_records_nothing(workdir):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "plan", *SMOKE, "--workdir", str(workdir),
                             "--calibrate", "--sample-images", "2"], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("log: "):  # the first sample run has started (its log), no stage yet
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.splitlines()[-1].startswith("interrupted (stopped by SIGTERM): finished stage outputs")
    assert "estimate on" not in out
    assert _records(workdir) == {}  # and no torn file: records are only added once both samples finished
    assert sorted(p.name for p in (workdir / CALIBRATION_DIR).iterdir()) == ["sample"]


def test_a_full_disk_during_the_sample_is_one_line_and_records_nothing(tmp_path, mlflow_db_template):
    with tmpfs(tmp_path / "tmpfs", 4) as workdir:  # a real 4 MiB tmpfs: the sample's proposals do not fit
        shutil.copy(mlflow_db_template, workdir / "mlflow.db")
        proc = cli("plan", *SMOKE, "--workdir", str(workdir), "--calibrate", "--sample-images", "2")
        assert proc.returncode == 2 and "calibration run: 2 images per split" in proc.stdout
        # The sample run's own line, naming the file and the fix; plan adds none, and no traceback.
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert errors[0].startswith(f"error: {sample_dir(workdir)}/") and "no space left" in errors[0]
        assert _records(workdir) == {}
        assert "estimate on" not in proc.stdout
