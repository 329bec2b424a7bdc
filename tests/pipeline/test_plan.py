"""`python -m pipeline plan`: the preflight's one line per problem and exit 2 (a missing annotation
file, an MCG folder missing half the images, a workdir on a real tmpfs too small for the outputs,
more training workers than the cluster's GPUs), the estimate from the smoke run's calibration,
`--json`'s fields, and the plan's own MLflow run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from pipeline.cli import main
from pipeline.config import PROJECT_ROOT
from pipeline.plan.estimate import CALIBRATION_DIR, predict
from pipeline.plan.resources import resource_problems
from pipeline.plan.work import Work
from tests.helpers import tmpfs
from tests.pipeline.test_cli import cli

COCO_MINI = PROJECT_ROOT / "configs" / "coco_mini.yaml"
STAGE_FIELDS = {"items", "unit", "seconds", "gpu_hours", "disk_bytes", "peak_rss_bytes", "cached", "work", "assumed"}


def _problems(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("problem: ")]


def test_default_config_plans_with_no_problem_and_logs_a_run(workdir, capsys):
    from mlflow import MlflowClient

    assert main(["plan", "--workdir", str(workdir)]) == 0
    out, err = capsys.readouterr()
    assert _problems(err) == []
    assert "preflight: 0 problem(s)" in out and "images: train 600, minival 150, test 150" in out
    assert "train: 2640 images seen" in out  # (30 + 600 + 30) iterations x 4 images
    assert "`python -m pipeline plan --calibrate` measures every stage on two small samples" in out  # no calibration
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ion-default").experiment_id])
    assert [r.info.run_name for r in runs] == ["default: plan"]
    assert runs[0].data.metrics["problems"] == 0.0 and runs[0].data.metrics["tune_items"] == 60 * 150


def test_json_estimate_comes_from_the_smoke_runs_calibration(smoke_run, workdir, capsys):
    shutil.copytree(smoke_run.workdir / CALIBRATION_DIR, workdir / CALIBRATION_DIR)
    assert main(["plan", "--config", "configs/smoke.yaml", "--workdir", str(workdir), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan) == {"problems", "stages", "total_seconds", "calibration"}
    assert plan["problems"] == [] and plan["calibration"]["assumed"] == []
    assert list(plan["stages"]) == ["data", "proposals", "train", "detect", "tune", "evaluate"]
    for name, stage in plan["stages"].items():
        assert set(stage) == STAGE_FIELDS and stage["cached"] is False
        manifest = json.loads((smoke_run.dirs[name] / "manifest.json").read_text())
        # The same work as the calibrating run: its measured figures, exactly.
        assert stage["seconds"] == pytest.approx(manifest["timings"]["run_s"], rel=1e-3)
        assert stage["disk_bytes"] == manifest["timings"]["disk_bytes"] > 0
        assert stage["peak_rss_bytes"] == manifest["timings"]["peak_rss_bytes"] > 0
        assert stage["gpu_hours"] == 0.0
    assert plan["total_seconds"] == pytest.approx(sum(s["seconds"] for s in plan["stages"].values()))


def test_calibration_fit_separates_fixed_and_per_item_costs():
    records = [{"items": 100, "work": {"images_seen": 100}, "seconds": 30.0, "disk_bytes": 1000,
                "peak_rss_bytes": None},
               {"items": 300, "work": {"images_seen": 300}, "seconds": 50.0, "disk_bytes": 3000,
                "peak_rss_bytes": 2e9}]
    fig = predict("train", records, Work({"images_seen": 1200}))
    assert fig["seconds"] == pytest.approx(20.0 + 0.1 * 1200)  # 20 s fixed + 0.1 s per item
    assert fig["disk_bytes"] == pytest.approx(12000) and fig["peak_rss_bytes"] == 2e9
    one = predict("train", records[1:], Work({"images_seen": 600}))  # one size: per item only, memory flat
    assert (one["seconds"], one["disk_bytes"], one["peak_rss_bytes"]) == pytest.approx((100.0, 6000, 2e9))


def test_peak_memory_grows_only_where_a_split_is_held_whole():
    records = [{"items": n, "work": {"images": n, "images_seen": n}, "seconds": 1.0, "disk_bytes": 1,
                "peak_rss_bytes": rss} for n, rss in ((100, 1.0e9), (300, 1.2e9))]
    # The data stage holds the annotation JSON: 0.9 GB + 1 MB per image.
    assert predict("data", records, Work({"images": 1200}))["peak_rss_bytes"] == pytest.approx(2.1e9)
    # Training streams its images: the largest peak measured, whatever the work.
    assert predict("train", records, Work({"images_seen": 1200}))["peak_rss_bytes"] == 1.2e9
    # A tune worker holds minival's candidates, 28 bytes each, on top of the largest baseline.
    tune = [{"items": 1, "work": {"candidates": n}, "peak_rss_bytes": rss} for n, rss in ((1e6, 1.1e9), (2e6, 1.0e9))]
    assert predict("tune", tune, Work({"candidates": 1e8}))["peak_rss_bytes"] == pytest.approx(1.072e9 + 28 * 1e8)


def test_rpn_training_is_fitted_on_its_own_iterations():
    # 10 s fixed + 0.5 s per image, plus the RPN's training at 2 s per image seen (timed on its own).
    records = [{"items": n, "work": {"images": n, "rpn_images_seen": 40}, "parts": {"rpn_training": 80.0},
                "seconds": 10.0 + 0.5 * n + 80.0, "disk_bytes": 100 * n, "peak_rss_bytes": 1e9} for n in (20, 60)]
    fig = predict("proposals", records, Work({"images": 1000, "rpn_images_seen": 400}))
    assert fig["seconds"] == pytest.approx(10.0 + 0.5 * 1000 + 2.0 * 400)
    assert fig["disk_bytes"] == pytest.approx(100 * 1000)


def test_tune_and_evaluate_grow_with_detects_candidates(tmp_path):
    from pipeline.config import load_config
    from pipeline.graph import cache_materials, registered_stages
    from pipeline.plan.estimate import Calibration, calibration_key, device_kind, estimate_stage

    cfg = load_config("smoke", [], workdir=tmp_path)
    materials = cache_materials(registered_stages(), cfg)
    calibration, device = Calibration(tmp_path), device_kind(cfg.runtime)
    minival = 20
    for name, work, seconds in (("detect", {"image_passes": 40, "images": 20, "candidates": 2000}, 40.0),
                                ("tune", {"trials": 2, "trial_images": 40, "candidates": 2000,
                                          "trial_candidates": 4000}, 8.0)):
        calibration.add(name, calibration_key(name, cfg, materials[name][1], device),
                        {"items": work["image_passes" if name == "detect" else "trial_candidates"], "work": work,
                         "parts": {}, "seconds": seconds, "disk_bytes": 10 * work["candidates"],
                         "peak_rss_bytes": 1e9})
    counts = {"train": 50, "minival": minival, "test": 20}

    def tune(**kw):
        return estimate_stage("tune", cfg, material=materials["tune"][1], counts=counts, cached=False,
                              calibration=calibration, device=device, **kw)

    # Detect has run: its candidates per image, 500 on minival, set the work (4x the calibration's per image).
    known = tune(candidates={"minival": 500.0})
    assert known.items == cfg.tune.trials * minival and known.assumed == ()
    assert known.seconds == pytest.approx(8.0 / 4000 * cfg.tune.trials * minival * 500)
    # Before detect: the calibration's 100 per image is assumed, and the estimate says so.
    assumed = tune(assumed_per_image=100.0)
    assert assumed.assumed == ("candidates",) and "assumed" in assumed.source
    assert assumed.seconds == pytest.approx(8.0 / 4000 * cfg.tune.trials * minival * 100)
    # Neither: no time, and why.
    assert tune().seconds is None and "candidates unknown until detect runs" in tune().source


def test_missing_annotation_file_is_one_line(workdir, tmp_path, capsys):
    missing = tmp_path / "instances_train2017.json"
    rc = main(["plan", "--config", str(COCO_MINI), "--workdir", str(workdir),
               "-o", f"data.coco.train_annotations={missing}"])
    assert rc == 2
    assert _problems(capsys.readouterr().err) == [
        f"problem: {missing}: no such file (check the path in the data config)"]


def test_rpn_weights_that_do_not_fit_the_rpn_are_one_line(workdir, tmp_path, capsys):
    weights = tmp_path / "vgg16.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, weights)
    rc = main(["plan", "--workdir", str(workdir), "-o", f"proposals.rpn.imagenet_weights={weights}"])
    assert rc == 2
    assert _problems(capsys.readouterr().err) == [
        f"problem: {weights}: proposals.rpn.imagenet_weights: VGG16 weights need a backbone of width 1.0, without "
        f"batchnorm, with block_convs [2, 2, 3, 3, 3] (got width 0.125, batchnorm True, block_convs [2, 2, 3, 3, 3]); "
        f"fix those in proposals.rpn or drop proposals.rpn.imagenet_weights"]


def _mcg_for_half(shared_dir: Path, folder: Path) -> int:
    """A .mat of MCG boxes for every other coco-mini image; returns how many images lack one."""
    missing = 0
    for split in ("train2017", "val2017"):
        images = sorted((shared_dir / "data" / "coco-mini" / split).glob("*.jpg"))
        (folder / split).mkdir(parents=True)
        for image in images[::2]:
            boxes = np.array([[1, 1, 20, 30], [5, 5, 40, 60]], dtype=np.float64)  # MCG's 1-based [y1 x1 y2 x2]
            scipy.io.savemat(folder / split / f"{image.stem}.mat", {"boxes": boxes, "scores": np.ones((2, 1))})
        missing += len(images) - len(images[::2])
    return missing


def test_mcg_folder_missing_half_the_images_is_one_line(shared_dir, workdir, tmp_path, capsys):
    missing = _mcg_for_half(shared_dir, tmp_path / "mcg")
    args = ["plan", "--config", str(COCO_MINI), "--workdir", str(workdir),
            "-o", f"proposals.mcg.dir={tmp_path / 'mcg'}", "-o", "proposals.bottom_up=mcg"]
    assert main(args) == 2
    assert _problems(capsys.readouterr().err) == [
        f"problem: proposals.mcg.dir: {tmp_path / 'mcg'}: no MCG .mat file for {missing} of 159 images; add the "
        f"files, or set proposals.mcg.allow_missing: true to give those images no MCG boxes (RPN boxes only)"]
    assert main(args + ["-o", "proposals.mcg.allow_missing=true"]) == 0
    assert f"note: MCG: {missing} of 159 images have no .mat file" in capsys.readouterr().out


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A real 4 MiB tmpfs."""
    with tmpfs(tmp_path / "tmpfs", 4) as mount:
        yield mount


def test_workdir_too_small_for_the_predicted_outputs_is_one_line(smoke_run, small_tmpfs, mlflow_db_template):
    shutil.copytree(smoke_run.workdir / CALIBRATION_DIR, small_tmpfs / CALIBRATION_DIR)
    shutil.copy(mlflow_db_template, small_tmpfs / "mlflow.db")
    # In a process of its own, as users run it: nothing of it keeps the mount busy afterwards.
    proc = cli("plan", "--config", "configs/smoke.yaml", "--workdir", str(small_tmpfs))
    problems = _problems(proc.stderr)
    assert proc.returncode == 2 and len(problems) == 1
    assert problems[0].startswith(f"problem: runtime.workdir: {small_tmpfs} has ")
    assert "but the stages to run are predicted to write" in problems[0]
    assert problems[0].endswith("free space there or pass --workdir on a larger disk")


@pytest.mark.parametrize("device, workers, gpus, expected", [
    ("auto", 4, 2, "runtime.train_workers: 4 training workers take one GPU each, but the cluster has 2 GPUs; "
                   "set -o runtime.train_workers=2 (the minibatch is train.images_per_batch per worker) or add GPUs"),
    ("cuda", 1, 0, "runtime.device: cuda, but the cluster has no GPU; set runtime.device: auto (or cpu), or join a "
                   "cluster with GPUs (runtime.ray_address)"),
    ("auto", 4, 0, None),  # no GPU: four CPU workers
    ("cpu", 4, 2, None),  # device cpu asks for no GPU
    ("auto", 2, 2, None),
])
def test_resource_problems(device, workers, gpus, expected):
    from stages.contract import RuntimeConfig

    runtime = RuntimeConfig(device=device, train_workers=workers)
    assert resource_problems(runtime, gpus=gpus, where="the cluster") == ([expected] if expected else [])


@pytest.fixture()
def ray_with_two_gpus():
    """A local Ray instance declaring two logical GPUs (no hardware needed)."""
    import ray

    ray.init(num_cpus=1, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_run_with_more_training_workers_than_gpus_stops_before_any_stage(ray_with_two_gpus, workdir, capsys):
    rc = main(["run", "--config", "coco_ion", "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines()[-1] == (
        "error: runtime.train_workers: 4 training workers take one GPU each, but the Ray cluster (1 node, 1 CPUs, "
        "2 GPUs) has 2 GPUs; set -o runtime.train_workers=2 (the minibatch is train.images_per_batch per worker) "
        "or add GPUs")
    assert not (workdir / "artifacts").exists()
    assert main(["plan", "--config", "coco_ion", "--workdir", str(workdir)]) == 2
    assert "problem: runtime.train_workers: 4 training workers" in capsys.readouterr().err


def test_run_ends_with_predicted_against_measured_time(smoke_run):
    # The session's smoke run started with no calibration: every stage says so, and is calibrated by it.
    lines = smoke_run.report.predicted
    assert lines[0] == "predicted vs measured time:"
    assert [line.split()[0] for line in lines[1:]] == ["data", "proposals", "train", "detect", "tune", "evaluate"]
    assert all(" predicted ?  measured " in line and line.endswith("(now calibrated)") for line in lines[1:])


def test_unreachable_ray_cluster_is_one_line(workdir, capsys, monkeypatch):
    import socket

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(["plan", "--workdir", str(workdir), "-o", f"runtime.ray_address=127.0.0.1:{port}"])
    problems = _problems(capsys.readouterr().err)
    assert rc == 2 and len(problems) == 1
    assert problems[0].startswith(f"problem: runtime.ray_address=127.0.0.1:{port}: cannot reach the Ray cluster (")
