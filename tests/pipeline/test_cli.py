"""The command line: exit statuses, messages, the shipped configs, a smoke run of the data stage."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from pipeline.cli import main
from pipeline.config import DEFAULT_CONFIG, PROJECT_ROOT, Config, config_reference, load_config, shipped_configs
from pipeline.graph import cache_keys, registered_names, registered_stages

SMOKE = PROJECT_ROOT / "configs" / "smoke.yaml"


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bad_config_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("runtime:\n  num_workers: 0\n")
    proc = cli("run", "--config", str(bad), "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2
    assert proc.stderr == (f"error: {bad}: runtime.num_workers: expected an integer >= 1, got 0 "
                           f"(fix the value or drop the key to use 2)\n")
    assert proc.stdout == "" and not (tmp_path / "w").exists()


def test_unknown_stage_exits_2_listing_the_known_ones(tmp_path):
    proc = cli("run", "--stages", "data,tuning", "--workdir", str(tmp_path))
    known = ", ".join(registered_names())
    assert proc.returncode == 2
    assert proc.stderr == f"error: --stages data,tuning: unknown stage 'tuning' (known stages: {known}; or all)\n"


@pytest.mark.parametrize("args, message", [
    (["status", "--config", "configs/nope.yaml"],
     "error: configs/nope.yaml: no such config file (give a path, or one of the shipped configs: "
     + ", ".join(shipped_configs()) + ")\n"),
    (["status", "-o", "seed=-1"], "error: -o seed=-1: seed: expected an integer >= 0, got -1 (fix the value or drop "
                                  "the -o to use 0)\n"),
    (["status", "-o", "runtime.workers=2"], "error: -o runtime.workers=2: runtime.workers: unknown key (did you mean "
                                            "'num_workers'? known keys of runtime: workdir, device, num_workers, "
                                            "train_workers, ray_address)\n"),
])
def test_user_errors_exit_2(capsys, args, message):
    assert main(args) == 2
    assert capsys.readouterr().err == message


def test_yaml_syntax_error_exits_2(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    assert main(["status", "--config", str(broken)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {broken}: not valid YAML (line 2, column 1)")


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "run" in capsys.readouterr().err


def test_shipped_configs_load(tmp_path):
    default = load_config(DEFAULT_CONFIG)
    assert default.name == "default" and default.runtime.workdir == str(PROJECT_ROOT / "workdir")
    smoke = load_config(SMOKE, ["seed=3", "train.phases[0].lr_start=0.125"], workdir=tmp_path)
    assert smoke.name == "smoke" and smoke.seed == 3 and smoke.runtime.workdir == str(tmp_path)
    assert smoke.train.phases[0].lr_start == 0.125
    assert smoke.runtime.device == default.runtime.device  # inherited through `extends`


def test_config_docs_cover_every_section(capsys):
    assert main(["config-docs"]) == 0
    text = capsys.readouterr().out
    assert text == config_reference() + "\n"
    for section in ("data", "model", "proposals", "train", "detect", "tune", "evaluate", "runtime"):
        assert f"\n## {section}\n" in text
    assert "| `num_workers` | an integer | `2` | >= 1 |" in text
    assert Config().runtime.num_workers == 2


def test_missing_upstream_names_the_command_that_makes_it(tmp_path, capsys):
    stage = next(s for s in registered_stages() if s.upstream)
    cfg = load_config(SMOKE, workdir=tmp_path)
    keys = cache_keys(registered_stages(), cfg)
    upstream = stage.upstream[0]
    assert main(["run", "--config", "configs/smoke.yaml", "--workdir", str(tmp_path), "--stages", stage.name]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: stage {stage.name!r} needs the output of {upstream!r} "
                          f"(key {keys[upstream][:12]}) which is missing: run python -m pipeline run "
                          f"--config configs/smoke.yaml --workdir {tmp_path} --stages ")
    assert err.endswith(f",{stage.name} (or --stages all)\n")


def test_smoke_run_of_the_data_stage(tmp_path, capsys):
    """The real CLI end to end: run (Ray, MLflow), then status and a cached rerun in-process."""
    proc = cli("run", "--stages", "data", "--config", "configs/smoke.yaml", "--workdir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "WARNING" not in proc.stderr and "INFO" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("data       ran") for line in lines)
    assert f"         mlflow ui --backend-store-uri sqlite:///{tmp_path.resolve()}/mlflow.db" in lines

    key = cache_keys(registered_stages(), load_config(SMOKE, workdir=tmp_path))["data"]
    assert (tmp_path / "artifacts" / "data" / key / "manifest.json").is_file()
    assert main(["status", "--config", "configs/smoke.yaml", "--workdir", str(tmp_path)]) == 0
    status = capsys.readouterr().out.splitlines()
    assert status[4].startswith(f"data       {key[:12]}  cached    ")

    assert main(["run", "--stages", "data", "--config", "configs/smoke.yaml", "--workdir", str(tmp_path)]) == 0
    assert any(line.startswith("data       cached") for line in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize("command", [
    ["run", "--config", "smoke", "--stages", "data"],
    ["ablations", "--configs", str(PROJECT_ROOT / "configs" / "ablations" / "irnn_identity.yaml"), "--stages", "data"],
    ["predict", "--config", "smoke", "--images", str(SMOKE), "--model-uri", "runs:/0123/model", "--out", "out"],
])
def test_commands_that_run_stages_share_one_path(command, tmp_path, monkeypatch, capsys):
    """run, ablations and predict (from MLflow) go through pipeline/execution/session.py: a
    tracking server that does not answer stops them before any work with one line, and the
    run log in the workdir holds it."""
    with socket.socket() as s:  # a port nobody listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.chdir(tmp_path)
    workdir = tmp_path / "w"
    assert main([*command, "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert err.count("error: MLFLOW_TRACKING_URI=") == 1 and "the MLflow server does not answer" in err
    logs = list((workdir / "logs").glob("run-*.log"))
    assert len(logs) == 1 and "the MLflow server does not answer" in logs[0].read_text(encoding="utf-8")
    assert not (workdir / "artifacts").exists()
