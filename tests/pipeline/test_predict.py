"""What the pipeline trained, used: `predict` on photos, the detector as an MLflow
model, the runs table, and a cache that sees code (status in a copy of the project)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.config import PROJECT_ROOT
from tests.conftest import SHARED
from tests.helpers import SMOKE_CONFIG

COCO_MINI = SHARED / "data" / "coco-mini" / "val2017"
PHOTO_SIDE = 160  # photos shrunk so selective search takes a second, not ten


def _photos(folder: Path, count: int) -> list[Path]:
    sources = sorted(COCO_MINI.glob("*.jpg"))[:count]
    assert len(sources) == count, f"{COCO_MINI}: needs {count} photos (../shared beside the checkout)"
    written = []
    for i, source in enumerate(sources):
        with Image.open(source) as image:
            image.thumbnail((PHOTO_SIDE, PHOTO_SIDE))
            if i == 1:  # greyscale
                path = folder / f"grey_{source.name}"
                image.convert("L").save(path)
            elif i == 2:  # 16-bit greyscale PNG
                path = folder / "deep" / f"{source.stem}.png"
                path.parent.mkdir(exist_ok=True)
                grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257
                deep = Image.fromarray(grey)
                assert deep.mode == "I;16"
                deep.save(path)
            else:
                path = folder / source.name
                image.save(path)
        written.append(path)
    return written


def test_predict_on_photos_writes_detections_and_drawn_images(smoke_run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    folder = tmp_path / "photos"
    folder.mkdir()
    photos = _photos(folder, 3)
    # A messy folder: two photos whose drawn names could collide, a truncated JPEG, a FIFO (never
    # opened: reading it would block), a PNG whose header declares 180 Mpx, a text file.
    with Image.open(photos[0]) as image:
        image.save(folder / "b.png")
        image.save(folder / "b-2.jpg")
    photos += [folder / "b-2.jpg", folder / "b.png"]
    whole = photos[0].read_bytes()
    (folder / "broken.jpg").write_bytes(whole[:len(whole) * 2 // 3])  # the header whole, the pixels cut
    os.mkfifo(folder / "pipe.jpg")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 15000, 12000, 8, 2, 0, 0, 0))  # 180 Mpx, 8-bit RGB
    (folder / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                                      + chunk(b"IEND", b""))
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code = main(["predict", "--config", "smoke", "--workdir", str(smoke_run.workdir), "--images", str(folder),
                 "--out", str(out), "--threshold", "0.0"])
    err = capsys.readouterr().err
    assert code == 0, err
    for name in ("notes.txt", "pipe.jpg", "huge.png", "broken.jpg"):
        assert len([line for line in err.splitlines() if f"{folder / name}:" in line]) == 1, (name, err)
    assert "skipped 3 file(s) that are not readable images" in err  # by their header: notes, pipe, huge
    assert "skipped 1 file(s) that could not be read to the end" in err and "truncated" in err
    results = json.loads((out / "detections.json").read_text())
    assert results and {r["file_name"] for r in results} <= {str(p) for p in photos}
    assert all(len(r["bbox"]) == 4 and 0.0 <= r["score"] <= 1.0 and "category_id" in r for r in results)
    drawn = sorted(p.name for p in (out / "drawn").iterdir())
    assert drawn == sorted(["deep__" + photos[2].stem + ".jpg", photos[0].stem + ".jpg", photos[1].stem + ".jpg",
                            "b.jpg", "b-2.jpg"])
    with Image.open(out / "drawn" / "b.jpg") as b, Image.open(out / "drawn" / "b-2.jpg") as b2:
        assert b.size == b2.size  # both drawn, from the same pixels
    with Image.open(out / "drawn" / drawn[0]) as image:
        assert image.mode == "RGB"


def test_predict_without_images_or_model_exits_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "--config", "smoke", "--workdir", str(tmp_path), "--images", str(empty),
                 "--out", str(tmp_path / "out")]) == 2
    assert "no readable image" in capsys.readouterr().err
    photo = tmp_path / "one.png"
    Image.new("RGB", (32, 24)).save(photo)
    assert main(["predict", "--config", "smoke", "--workdir", str(tmp_path / "none"), "--images", str(photo),
                 "--out", str(tmp_path / "out")]) == 2
    assert "--stages data,proposals,train" in capsys.readouterr().err


def test_smoke_run_logs_model_code_version_and_headline_results(smoke_run, tmp_path, monkeypatch):
    import mlflow.pyfunc
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{smoke_run.workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(smoke_run.cfg.name)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    assert runs and all(r.data.tags.get("code_version") for r in runs)
    config_sha = hashlib.sha256(SMOKE_CONFIG.read_bytes()).hexdigest()
    assert {r.data.tags.get("config_sha256") for r in runs} == {config_sha}
    parent = client.get_run(smoke_run.report.parent_run_id)
    assert parent.info.run_name == "smoke: all"
    evaluate = next(o for o in smoke_run.report.outcomes if o.name == "evaluate")
    assert parent.data.metrics["test_AP"] == pytest.approx(evaluate.metrics["AP"])
    assert "tuned_nms_iou" in parent.data.metrics and "train_images_per_s" in parent.data.metrics
    train_run = next(o for o in smoke_run.report.outcomes if o.name == "train").run_id
    model_files = {a.path for a in client.list_artifacts(train_run, "model")}
    assert "model/MLmodel" in model_files
    assert "model/thresholds/best.json" in {a.path for a in client.list_artifacts(train_run, "model/thresholds")}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{smoke_run.workdir / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"runs:/{train_run}/model")
    tuned = json.loads((smoke_run.dirs["tune"] / "best.json").read_text())
    assert model.unwrap_python_model().predictor.thresholds["nms_iou"] == tuned["nms_iou"]
    photo = _photos(tmp_path, 1)[0]
    frame = model.predict([str(photo)])
    assert list(frame.columns) == ["file_name", "image_id", "category_id", "category", "bbox", "score"]
    assert set(frame["file_name"]) <= {str(photo)}


def _status(copy: Path, workdir: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(copy)}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "pipeline", "status", "--config", "smoke", "--workdir",
                           str(workdir)], cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()
             if line.split() and line.split()[0] in ("data", "proposals", "train", "detect", "tune", "evaluate")}
    return lines


def _append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def test_status_in_a_copy_names_the_edited_module(smoke_run, tmp_path):
    copy = tmp_path / "project"
    for package in ("ion", "proposals", "stages", "pipeline", "configs"):
        shutil.copytree(PROJECT_ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / "pyproject.toml", copy / "pyproject.toml")
    stages = ("data", "proposals", "train", "detect", "tune", "evaluate")

    lines = _status(copy, smoke_run.workdir)
    assert {s: lines[s].split()[2] for s in stages} == dict.fromkeys(stages, "cached")

    metrics = copy / "ion" / "evaluation" / "metrics.py"
    original = metrics.read_text()
    _append(metrics, "\n# an edit\n")
    lines = _status(copy, smoke_run.workdir)
    assert {s: lines[s].split()[2] for s in stages} == {"data": "cached", "proposals": "cached", "train": "cached",
                                                         "detect": "cached", "tune": "stale", "evaluate": "stale"}
    assert "module ion/evaluation/metrics.py" in lines["tune"]
    assert "module ion/evaluation/metrics.py" in lines["evaluate"]

    metrics.write_text(original)
    _append(copy / "proposals" / "selective_search.py", "\n# an edit\n")
    lines = _status(copy, smoke_run.workdir)
    assert {s: lines[s].split()[2] for s in stages} == {"data": "cached", **dict.fromkeys(stages[1:], "stale")}
    assert "module proposals/selective_search.py" in lines["proposals"]
    assert "upstream proposals" in lines["train"]
