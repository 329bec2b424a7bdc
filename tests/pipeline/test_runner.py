"""The runner on fake stages: caching, reruns, failures, resuming, locking, MLflow runs."""
from __future__ import annotations

import json
import multiprocessing
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ion.errors import UserError
from pipeline.cache.store import MANIFEST, ArtifactStore, file_sha256
from pipeline.graph import cache_keys
from pipeline.runner import format_summary
from pipeline.tracking.client import tracking_uri_for
from tests.pipeline import fake_stages
from tests.pipeline.fake_stages import Beta, config, run

POLL_DEADLINE_S = 300  # far beyond any run here: only a hang reaches it


def ran(report) -> dict[str, bool]:
    return {o.name: not o.cached for o in report.outcomes}


def client(workdir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def runs_by_stage(workdir: Path, parent_run_id: str) -> dict[str, object]:
    c = client(workdir)
    experiment = c.get_experiment_by_name("fake")
    runs = c.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.data.tags["stage"]: r for r in runs}


def test_first_run_produces_then_rerun_reuses(workdir):
    cfg = config(workdir)
    first = run(cfg)
    assert ran(first) == {"one": True, "two": True, "three": True}
    store, keys = ArtifactStore(workdir), cache_keys(fake_stages.stages(), cfg)
    out = store.path("two", keys["two"])
    assert json.loads((out / "two.json").read_text()) == {"value": 10.5, "label": None}
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["key"] == keys["two"] and manifest["upstream"] == {"one": keys["one"]}
    assert manifest["files"] == {"two.json": {"sha256": file_sha256(out / "two.json"),
                                              "bytes": (out / "two.json").stat().st_size}}
    assert manifest["metrics"] == {"two_value": 10.5}
    assert manifest["mlflow_run_id"] == first.outcomes[1].run_id

    second = run(cfg)
    assert ran(second) == {"one": False, "two": False, "three": False}
    assert second.outcomes[2].metrics == {"three_value": 21.0}  # headline metrics come from the manifest
    summary = format_summary(second)
    assert "three      cached" in summary and "three_value 21" in summary and "three doubled it" in summary
    assert f"mlflow ui --backend-store-uri sqlite:///{workdir.resolve()}/mlflow.db" in summary


def test_changing_a_read_value_reruns_that_stage_and_downstream_only(workdir):
    run(config(workdir))
    report = run(config(workdir, beta=Beta(b=0.25)))
    assert ran(report) == {"one": False, "two": True, "three": True}
    assert ran(run(config(workdir, gamma=fake_stages.Alpha(a=9)))) == {"one": False, "two": False, "three": False}


def test_rerun_one_stage_uses_cached_upstream(workdir, tmp_path, monkeypatch):
    log = tmp_path / "calls.log"
    monkeypatch.setenv(fake_stages.LOG_ENV, str(log))
    run(config(workdir))
    report = run(config(workdir, beta=Beta(label="new")), "two,three")
    assert ran(report) == {"two": True, "three": True}
    assert [line.split()[0] for line in log.read_text().splitlines()] == ["one", "two", "three", "two", "three"]


def test_missing_upstream_stops_before_any_work(workdir):
    cfg = config(workdir)
    keys = cache_keys(fake_stages.stages(), cfg)
    with pytest.raises(UserError) as err:
        run(cfg, "three")
    assert str(err.value) == (f"stage 'three' needs the output of 'two' (key {keys['two'][:12]}) which is missing: "
                              "run python -m pipeline run --stages one,two,three (or --stages all)")
    assert not (workdir / "artifacts").exists()
    assert client(workdir).get_experiment_by_name("fake") is None  # MLflow was not touched either

    run(cfg, "one")
    with pytest.raises(UserError, match=r"missing: run python -m pipeline run --stages two,three \(or"):
        run(cfg, "three")


def test_a_cached_stage_needs_no_upstream_output(workdir):
    cfg = config(workdir)
    run(cfg)
    store = ArtifactStore(workdir)
    (store.path("one", cache_keys(fake_stages.stages(), cfg)["one"]) / MANIFEST).unlink()
    assert ran(run(cfg, "two")) == {"two": False}
    with pytest.raises(UserError, match="stage 'two' needs the output of 'one'"):
        run(cfg, "two", force=True)


def test_stage_that_raises_leaves_no_manifest_and_the_rerun_resumes(workdir, monkeypatch):
    cfg = config(workdir)
    key = cache_keys(fake_stages.stages(), cfg)["one"]
    monkeypatch.setenv(fake_stages.FAIL_ENV, "one")
    with pytest.raises(RuntimeError, match="stage one failed on purpose"):
        run(cfg)
    out = ArtifactStore(workdir).path("one", key)
    assert not (out / MANIFEST).exists()
    assert sorted(p.name for p in out.iterdir()) == ["piece0.json", "piece1.json"]

    c = client(workdir)
    experiment = c.get_experiment_by_name("fake")
    (failed,) = c.search_runs([experiment.experiment_id], filter_string="tags.stage = 'one'")
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error"] == "RuntimeError: stage one failed on purpose"
    parent = c.get_run(failed.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED" and parent.data.tags["error"] == failed.data.tags["error"]

    monkeypatch.delenv(fake_stages.FAIL_ENV)
    assert ran(run(cfg)) == {"one": True, "two": True, "three": True}
    assert json.loads((out / "resumed.json").read_text()) == [0, 1]


def test_killed_stage_leaves_no_manifest_and_the_rerun_resumes(workdir, monkeypatch):
    monkeypatch.setenv(fake_stages.DIE_ENV, "one")
    # fork: the child starts with everything imported, so the test stays fast.
    child = multiprocessing.get_context("fork").Process(target=fake_stages.run_fake, args=(workdir,))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL
    monkeypatch.delenv(fake_stages.DIE_ENV)
    cfg = config(workdir)
    out = ArtifactStore(workdir).path("one", cache_keys(fake_stages.stages(), cfg)["one"])
    assert sorted(p.name for p in out.iterdir()) == ["piece0.json"]  # the first piece, no manifest

    assert ran(run(cfg)) == {"one": True, "two": True, "three": True}  # the lock died with the process
    assert json.loads((out / "resumed.json").read_text()) == [0]


def test_two_runs_at_once_produce_each_output_once(workdir, tmp_path, monkeypatch, capfd):
    """No sleeps to race: the first run holds stage one's lock (waiting at a gate)
    until the second has said it waits for it."""
    log, gate = tmp_path / "calls.log", tmp_path / "gate"
    monkeypatch.setenv(fake_stages.GATE_ENV, str(gate))
    monkeypatch.setenv(fake_stages.LOG_ENV, str(log))
    results: dict[str, dict[str, bool]] = {}

    def runner(name: str) -> None:
        results[name] = fake_stages.run_fake(workdir)

    first = threading.Thread(target=runner, args=("first",), daemon=True)
    first.start()
    deadline = time.monotonic() + POLL_DEADLINE_S  # only a hang reaches it: it fails instead
    while not (log.exists() and log.read_text()):  # the first run is inside stage one, holding its lock
        first.join(timeout=0.05)
        assert first.is_alive()
        assert time.monotonic() < deadline, "the first run never entered stage one"
    second = threading.Thread(target=runner, args=("second",), daemon=True)
    second.start()
    said = ""
    while "waiting for another run producing one" not in said:
        said += capfd.readouterr().err
        second.join(timeout=0.05)
        assert second.is_alive()
        assert time.monotonic() < deadline, f"the second run never said it waits: {said!r}"
    gate.touch()
    first.join(timeout=POLL_DEADLINE_S)
    second.join(timeout=POLL_DEADLINE_S)
    assert not first.is_alive() and not second.is_alive(), "a run did not finish after the gate opened"
    assert results == {"first": {"one": False, "two": False, "three": False},
                       "second": {"one": True, "two": True, "three": True}}
    assert (said + capfd.readouterr().err).count("waiting for another run producing one") == 1
    assert sorted(line.split()[0] for line in log.read_text().splitlines()) == ["one", "three", "two"]


def test_force_clears_and_recomputes(workdir, tmp_path, monkeypatch):
    cfg = config(workdir)
    run(cfg)
    out = ArtifactStore(workdir).path("one", cache_keys(fake_stages.stages(), cfg)["one"])
    (out / "stray.txt").write_text("left over")
    report = run(cfg, "one", force=True)
    assert ran(report) == {"one": True}
    assert not (out / "stray.txt").exists()
    assert json.loads((out / "resumed.json").read_text()) == []  # recomputed, nothing resumed


def test_a_killed_force_run_resumes_when_the_same_command_runs_again(workdir, monkeypatch):
    cfg = config(workdir)
    run(cfg)
    store = ArtifactStore(workdir)
    key = cache_keys(fake_stages.stages(), cfg)["one"]
    old = file_sha256(store.path("one", key) / MANIFEST)
    monkeypatch.setenv(fake_stages.FAIL_ENV, "one")  # the --force run stops after both pieces
    with pytest.raises(RuntimeError, match="failed on purpose"):
        run(cfg, "one", force=True)
    aside = store.root / "one" / ".replacing" / key
    assert sorted(p.name for p in aside.iterdir()) == ["piece0.json", "piece1.json"]
    (aside / f".piece2.json.{2**22 + 9}.0123abcd.tmp").write_bytes(b"torn")  # as a SIGKILLed writer leaves it
    assert file_sha256(store.path("one", key) / MANIFEST) == old  # the old output, whole, in use meanwhile
    monkeypatch.delenv(fake_stages.FAIL_ENV)
    assert ran(run(cfg, "one", force=True)) == {"one": True}
    out = store.path("one", key)
    assert json.loads((out / "resumed.json").read_text()) == [0, 1]  # both pieces taken from the killed run
    assert not aside.exists() and not list(out.glob("*.tmp")) and store.verify("one", key) == []


def test_mlflow_parent_and_child_runs(workdir):
    cfg = config(workdir)
    first = run(cfg)
    second = run(cfg, "two,three")
    c = client(workdir)
    experiment = c.get_experiment_by_name("fake")
    assert experiment.artifact_location == (workdir.resolve() / "mlartifacts").as_uri()

    parent = c.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["stages"] == "one,two,three"
    assert "config.yaml" in {a.path for a in c.list_artifacts(parent.info.run_id)}

    children = runs_by_stage(workdir, first.parent_run_id)
    assert set(children) == {"one", "two", "three"}
    keys = cache_keys(fake_stages.stages(), cfg)
    one = children["one"]
    assert one.info.status == "FINISHED"
    assert one.data.tags["cache_key"] == keys["one"] and one.data.tags["cache_hit"] == "false"
    assert one.data.params["alpha.a"] == "1" and one.data.params["seed"] == "0"
    assert one.data.metrics["a_times_ten"] == 10.0
    assert [m.step for m in c.get_metric_history(one.info.run_id, "piece")] == [0, 1]
    artifacts = {a.path for a in c.list_artifacts(one.info.run_id)}
    assert {"manifest.json", "config.yaml", "plots"} <= artifacts
    assert [a.path for a in c.list_artifacts(one.info.run_id, "plots")] == ["plots/curve.png"]
    assert children["two"].data.params["extra.note"] == "from two"  # ctx.log_params

    cached = runs_by_stage(workdir, second.parent_run_id)
    assert set(cached) == {"two", "three"}
    for name, child in cached.items():
        assert child.data.tags["cache_hit"] == "true"
        assert child.data.tags["produced_by"] == children[name].info.run_id
        assert child.data.tags["cache_key"] == keys[name]


def test_tracking_uri_env_overrides_the_workdir_store(workdir, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    assert tracking_uri_for(workdir) == f"sqlite:///{other}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri_for(workdir) == f"sqlite:///{workdir.resolve()}/mlflow.db"
