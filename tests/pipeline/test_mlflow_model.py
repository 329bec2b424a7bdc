"""The detector as an MLflow model a user can take away: it loads without the
project on the import path, takes image bytes, is served by `mlflow models
serve`, and is registered in the Model Registry once per trained output."""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import PROJECT_ROOT
from tests.helpers import SMOKE_CONFIG
from tests.pipeline.test_predict import _photos

MLFLOW_EXE = Path(sys.executable).parent / "mlflow"
SERVE_DEADLINE_S = 300  # start-up: imports, the model download, torch; generous for a loaded machine

# Run by `python -I` (no PYTHONPATH, no current folder on sys.path): drops the editable
# install's finder and any path of a checkout, so the project can come only from the model.
ISOLATED = r'''
import importlib.metadata as md, importlib.util, json, os, sys
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

uri, dst, photo, *roots = sys.argv[1:]
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p and os.path.realpath(p or ".") not in roots]
before = [name for name in ("pipeline", "stages", "proposals", "ion") if importlib.util.find_spec(name)]

import mlflow.artifacts, mlflow.pyfunc
import pandas as pd

local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
fetched = set(sys.modules)  # what reading the tracking store took (not the model's to need)
model = mlflow.pyfunc.load_model(local)
by_path = model.predict(pd.DataFrame({"path": [photo]}))
data = open(photo, "rb").read()
by_bytes = model.predict(pd.DataFrame({"image": [data, b"not an image", data[: len(data) // 3]]}))
files = {name: sys.modules[name].__file__ for name in
         ("pipeline.tracking.model", "pipeline.commands.predict_images", "proposals.mix", "ion.data.images")}

# Every distribution the process imported is a requirement of the model or one's dependency.
wanted, todo = set(), [Requirement(line.strip()).name for line in open(f"{local}/requirements.txt")
                       if line.strip() and not line.startswith("#")]
while todo:
    name = canonicalize_name(todo.pop())
    if name in wanted:
        continue
    wanted.add(name)
    try:
        todo += [Requirement(r).name for r in md.requires(name) or () if "extra ==" not in r]
    except md.PackageNotFoundError:
        pass
owner = {}  # installed file -> its distribution (by file: namespace packages such as google.* span several)
for dist in md.distributions():
    for f in dist.files or ():
        if f.suffix in (".py", ".so"):
            owner[os.path.realpath(dist.locate_file(f))] = canonicalize_name(dist.metadata["Name"])
used = {}
for name, module in [(n, m) for n, m in list(sys.modules.items()) if n not in fetched]:
    found = owner.get(os.path.realpath(getattr(module, "__file__", None) or "/"))
    if found:
        used.setdefault(found, name)
unlisted = sorted(f"{d} ({m})" for d, m in used.items() if d not in wanted | {"ion-pipeline"})
print(json.dumps({"before": before, "local": local, "files": files, "unlisted": unlisted,
                  "by_path": by_path.to_dict("records"), "by_bytes": by_bytes.to_dict("records")}))
'''


def _train_run(smoke_run) -> str:
    return next(o for o in smoke_run.report.outcomes if o.name == "train").run_id


def _tracking_env(smoke_run) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{smoke_run.workdir / 'mlflow.db'}"
    # `mlflow models serve` runs `uvicorn` from PATH: the environment's, as an activated one has it
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _detections(rows: list[dict]) -> list[tuple]:
    """(image_id, category_id, bbox, score) of the detection rows, best first."""
    found = [(r["image_id"], r["category_id"], list(r["bbox"]), r["score"]) for r in rows if not r.get("error")]
    return sorted(found, key=lambda d: (d[0], -d[3], d[1]))


def _assert_same(got: list[tuple], want: list[tuple]) -> None:
    assert len(got) == len(want) and want
    for (gi, gc, gb, gs), (wi, wc, wb, ws) in zip(got, want):
        assert (gi, gc) == (wi, wc)
        assert gb == pytest.approx(wb, rel=1e-4, abs=1e-3) and gs == pytest.approx(ws, rel=1e-4, abs=1e-5)


def test_logged_model_loads_without_the_checkout_and_takes_image_bytes(smoke_run, tmp_path):
    photo = _photos(tmp_path, 1)[0]
    uri = f"runs:/{_train_run(smoke_run)}/model"
    done = subprocess.run([sys.executable, "-I", "-c", ISOLATED, uri, str(tmp_path / "model"), str(photo),
                           str(PROJECT_ROOT), str(Path("/work/main"))],
                          cwd=tmp_path, env=_tracking_env(smoke_run), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["before"] == []  # nothing of the project was importable before the model was loaded
    code = Path(got["local"]) / "code"
    assert all(Path(f).is_relative_to(code) for f in got["files"].values()), got["files"]
    assert got["unlisted"] == []  # requirements.txt covers what inference imports

    by_path, by_bytes = got["by_path"], got["by_bytes"]
    assert {r["file_name"] for r in by_path} == {str(photo)} and not any(r["error"] for r in by_path)
    _assert_same(_detections([r for r in by_bytes if r["image_id"] == 0]), _detections(by_path))
    errors = {r["image_id"]: r["error"] for r in by_bytes if r["error"]}
    assert set(errors) == {1, 2} and len([r for r in by_bytes if r["image_id"] in (1, 2)]) == 2
    assert errors[1].startswith("row 1 (image bytes): cannot read the image") and "JPEG/PNG" in errors[1]
    assert errors[2].startswith("row 2 (image bytes): cannot read the image")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as answer:
        return json.loads(answer.read())


@pytest.mark.skipif(not MLFLOW_EXE.is_file(), reason=f"no `mlflow` executable next to {sys.executable}")
def test_served_model_answers_a_posted_photo_as_predict_does(smoke_run, tmp_path, monkeypatch):
    import mlflow.pyfunc

    photo = _photos(tmp_path, 1)[0]
    uri = f"runs:/{_train_run(smoke_run)}/model"
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(MLFLOW_EXE), "models", "serve", "-m", uri, "--env-manager", "local",
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  cwd=tmp_path, env=_tracking_env(smoke_run), stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + SERVE_DEADLINE_S
        while True:
            assert server.poll() is None, f"mlflow models serve exited:\n{log.read_text()[-4000:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5).close()
                break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, f"no answer in {SERVE_DEADLINE_S} s:\n{log.read_text()[-4000:]}"
                time.sleep(0.5)
        image = base64.b64encode(photo.read_bytes()).decode()
        served = _post(f"http://127.0.0.1:{port}/invocations",
                       {"dataframe_split": {"columns": ["image"],
                                            "data": [[image], [base64.b64encode(b"<html>").decode()]]}})
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=60)

    rows = served["predictions"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{smoke_run.workdir / 'mlflow.db'}")
    local = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"path": [str(photo)]})).to_dict("records")
    _assert_same(_detections([r for r in rows if r["image_id"] == 0]), _detections(local))
    [bad] = [r for r in rows if r["image_id"] == 1]
    assert bad["error"].startswith("row 1 (image bytes): cannot read the image")


def test_train_registers_one_version_per_output_and_predict_takes_models_uris(smoke_run, tmp_path, monkeypatch,
                                                                              capsys):
    from mlflow import MlflowClient

    from pipeline.cli import main
    from pipeline.config import load_config
    from pipeline.graph import registered_stages
    from pipeline.runner import run_stages
    from pipeline.tracking.client import Tracker
    from pipeline.tracking.registry import download_artifacts

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    tracking_uri = f"sqlite:///{smoke_run.workdir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    outcomes = {o.name: o for o in smoke_run.report.outcomes}
    [version] = client.search_model_versions("name = 'ion-smoke'")
    assert version.run_id == outcomes["train"].run_id and version.source == f"runs:/{version.run_id}/model"
    train_run = client.get_run(version.run_id)
    assert version.tags["cache_key"] == outcomes["train"].key
    assert version.tags["code_version"] == train_run.data.tags["code_version"]
    assert version.tags["test_AP"] == f"{outcomes['evaluate'].metrics['AP']:.4g}"

    # A cached rerun registers nothing new.
    cfg = load_config(SMOKE_CONFIG, workdir=smoke_run.workdir)
    tracker = Tracker(tracking_uri=tracking_uri, experiment=cfg.name, workdir=smoke_run.workdir,
                      config_file=SMOKE_CONFIG)
    rerun = run_stages(cfg, stages=registered_stages(), selected=registered_stages(), tracker=tracker,
                       run_name="all")
    assert all(o.cached for o in rerun.outcomes)
    assert [v.version for v in client.search_model_versions("name = 'ion-smoke'")] == [version.version]

    # models:/ URIs: a version number, and an alias.
    folder = download_artifacts(f"models:/ion-smoke/{version.version}", tmp_path / "by-version",
                                tracking_uri=tracking_uri)
    assert (folder / "MLmodel").is_file()
    client.set_registered_model_alias("ion-smoke", "champion", version.version)
    photo = _photos(tmp_path, 1)[0]
    out = tmp_path / "out"
    code = main(["predict", "--config", "smoke", "--workdir", str(smoke_run.workdir), "--images", str(photo),
                 "--out", str(out), "--model-uri", "models:/ion-smoke@champion"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "detections.json").read_text())
    assert main(["predict", "--config", "smoke", "--workdir", str(smoke_run.workdir), "--images", str(photo),
                 "--out", str(out), "--model-uri", "models:/ion-smoke@nobody"]) == 2
    assert "--model-uri models:/ion-smoke@nobody: cannot download it" in capsys.readouterr().err
