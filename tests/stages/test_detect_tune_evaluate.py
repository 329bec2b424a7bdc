"""The detect, tune and evaluate stages on the smoke pipeline's outputs:
the raw candidate cache, the Optuna study and its resume, the
evaluation settings, test-dev submission files, and missing upstream outputs."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from pycocotools.coco import COCO

import stages.detect as detect_stage
import stages.evaluate as evaluate_stage
import stages.tune as tune_stage
from ion.data.split import DetectionSplit
from ion.errors import UserError
from ion.evaluation.coco_eval import coco_eval
from ion.evaluation.evaluator import Evaluator
from ion.evaluation.metrics import STAT_NAMES
from ion.evaluation.results import to_coco_results, validate_results
from ion.inference.predict import predict_raw
from ion.inference.tuning import Thresholds, apply_thresholds, objective
from pipeline.config import PROJECT_ROOT
from proposals.store import ProposalStore, ShardedWriter
from stages.helpers.raw_detections import label_names, read_raw, top_candidates
from stages.train import load_trained_detector
from tests.helpers import SMOKE_CONFIG, FakeContext, copy_artifact, without_test_annotations

SETTINGS = ("final", "no_flip", "no_voting", "baseline")


def _journal_trials(path: Path) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.load_study(study_name=tune_stage.STUDY_NAME, storage=storage).get_trials()


# ----------------------------------------------------------------------------- detect


def test_raw_cache_equals_running_the_detector(smoke_run):
    dirs, dcfg = smoke_run.dirs, smoke_run.cfg.detect
    split = DetectionSplit.load(dirs["data"], "minival")
    raw = {which: read_raw(dirs["detect"] / f"raw_minival_{which}.h5") for which in ("plain", "round1", "flip")}
    for which, per_image in raw.items():
        assert list(per_image) == [r.image_id for r in split.images]
        with ProposalStore(dirs["detect"] / f"raw_minival_{which}.h5") as store:
            assert store.source_names == tuple(label_names(split.categories))
            assert (store.attrs["set"], store.attrs["score_thresh"]) == (which, dcfg.score_thresh)
        for dets in per_image.values():
            assert (dets.scores >= dcfg.score_thresh).all()
            assert dets.labels.min() >= 1 and dets.labels.max() <= split.categories.num_classes

    model, model_cfg = load_trained_detector(dirs["train"], device=torch.device("cpu"))
    record = split.images[0]
    with ProposalStore(dirs["proposals"] / "mixed_minival.h5") as proposals:
        boxes, _ = proposals.get(record.image_id)
    direct = predict_raw(model, record.load(), boxes, min_size=model_cfg.input.min_size,
                         max_size=model_cfg.input.max_size, flip=True, score_thresh=dcfg.score_thresh,
                         two_rounds=dcfg.two_rounds)
    direct["round1"] = {key: value[direct["plain"]["round"] == 1] for key, value in direct["plain"].items()}
    assert 0 < len(direct["round1"]["boxes"]) < len(direct["plain"]["boxes"])
    for which in ("plain", "round1", "flip"):
        cached = raw[which][record.image_id]
        assert len(cached.boxes) > 0
        np.testing.assert_array_equal(cached.boxes, direct[which]["boxes"])
        np.testing.assert_array_equal(cached.scores, direct[which]["scores"])
        np.testing.assert_array_equal(cached.labels, direct[which]["labels"])
        assert cached.labels.dtype == np.int64


def test_top_candidates_keeps_the_best_in_their_order():
    raw = {"scores": np.array([0.2, 0.9, 0.2, 0.5, 0.1], np.float32), "labels": np.arange(1, 6),
           "round": np.array([1, 1, 2, 2, 2], np.int8)}
    kept = top_candidates(raw, 3)
    assert kept["scores"].tolist() == pytest.approx([0.2, 0.9, 0.5])  # of the two 0.2s, the earlier
    assert kept["labels"].tolist() == [1, 2, 4] and kept["round"].tolist() == [1, 1, 2]
    assert top_candidates(raw, None) is raw and top_candidates(raw, 5) is raw


def test_detect_keeps_at_most_max_candidates_per_image_and_set(smoke_run, tmp_path):
    dirs, dcfg = smoke_run.dirs, smoke_run.cfg.detect
    split = DetectionSplit.load(dirs["data"], "minival")
    records, sets = split.images[:2], ("plain", "round1", "flip")
    ids = [r.image_id for r in records]
    writers = {s: ShardedWriter(tmp_path / s, ids, images_per_shard=len(ids)) for s in sets}
    task = detect_stage.DetectTask(
        split="minival", shard=writers["plain"].shards[0],
        images=tuple((r.image_id, str(r.path), r.width, r.height) for r in records),
        proposals=str(dirs["proposals"] / "mixed_minival.h5"), train_dir=str(dirs["train"]),
        parts_dirs={s: str(w.directory) for s, w in writers.items()}, flip=True, score_thresh=dcfg.score_thresh,
        two_rounds=dcfg.two_rounds, round2=dcfg.round2, amp="off", max_candidates=7)
    assert detect_stage.detect_shard(task) == 2
    full = {s: read_raw(dirs["detect"] / f"raw_minival_{s}.h5") for s in sets}
    for s in sets:
        for image_id, boxes, scores, *_ in writers[s].iter_items():
            whole = full[s][image_id]
            assert len(whole.scores) > 7 and len(scores) == 7
            best = np.sort(np.argsort(-whole.scores, kind="stable")[:7])
            np.testing.assert_array_equal(scores, whole.scores[best])
            np.testing.assert_array_equal(boxes, whole.boxes[best])


# ----------------------------------------------------------------------------- tune


def test_best_thresholds_are_in_range_and_reproduce_their_ap(smoke_run):
    tcfg, dirs = smoke_run.cfg.tune, smoke_run.dirs
    best = json.loads((dirs["tune"] / "best.json").read_text())
    assert tcfg.nms_iou[0] <= best["nms_iou"] <= tcfg.nms_iou[1]
    assert tcfg.vote_iou[0] <= best["vote_iou"] <= tcfg.vote_iou[1]
    assert (best["score_thresh"], best["max_dets"]) == (0.05, 100)  # not tuned in the smoke config
    assert best["trials"] == tcfg.trials and best["candidates"] == "raw_minival_flip.h5"

    minival = DetectionSplit.load(dirs["data"], "minival")
    evaluator = Evaluator(minival.annotation_file)
    raw = read_raw(dirs["detect"] / "raw_minival_flip.h5")
    params = {k: best[k] for k in ("nms_iou", "vote_iou", "score_thresh", "max_dets")}
    assert best["AP"] == objective(evaluator, raw, Thresholds(**params))
    # The baseline is the Appendix's: round-1 boxes alone, unflipped, plain NMS, no voting.
    assert best["baseline"]["candidates"] == "raw_minival_round1.h5"
    round1 = read_raw(dirs["detect"] / "raw_minival_round1.h5")
    assert best["baseline"]["AP"] == objective(evaluator, round1, Thresholds(nms_iou=tcfg.baseline_nms_iou))

    trials = _journal_trials(dirs["tune"] / "study.journal")
    assert [t.number for t in trials] == list(range(tcfg.trials))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    top = max(trials, key=lambda t: t.value)
    assert (best["trial"], best["AP"], best["nms_iou"]) == (top.number, top.value, top.params["nms_iou"])
    for plot in ("history.png", "contour.png"):
        assert (dirs["tune"] / "plots" / plot).stat().st_size > 0


def _tune_inputs(smoke_run) -> dict[str, Path]:
    return {"data": smoke_run.dirs["data"], "detect": smoke_run.dirs["detect"]}


def _with_trials(cfg, trials: int):
    return dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, trials=trials))


def test_repeated_and_extended_study_resumes(smoke_run, tmp_path):
    cfg, journal_name = smoke_run.cfg, "study.journal"
    out = copy_artifact(smoke_run.dirs["tune"], tmp_path)
    (out / "manifest.json").unlink()
    before = _journal_trials(out / journal_name)

    # The same number of trials: the study is complete, nothing is evaluated again.
    ctx = FakeContext(tmp_path)
    tune_stage.run(cfg, _tune_inputs(smoke_run), out, ctx)
    assert ctx.maps == []
    assert len(_journal_trials(out / journal_name)) == len(before)

    # Three more trials: numbers continue, earlier trials are untouched.
    more = cfg.tune.trials + 3
    ctx = FakeContext(tmp_path)
    result = tune_stage.run(_with_trials(cfg, more), _tune_inputs(smoke_run), out, ctx)
    after = _journal_trials(out / journal_name)
    assert [t.number for t in after] == list(range(more))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in after)
    for old, new in zip(before, after):
        assert (new.params, new.value) == (old.params, old.value)
    evaluated = [task["params"] for fn, items in ctx.maps for task in items]
    assert all(fn is tune_stage.trial_ap for fn, _ in ctx.maps)
    assert evaluated == [t.params for t in after[len(before):]]
    # A resumed random sampler does not replay the first draws.
    assert all(t.params not in [o.params for o in before] for t in after[len(before):])
    assert [step for _, step in ctx.metrics] == list(range(len(before), more))
    evaluator = Evaluator(DetectionSplit.load(smoke_run.dirs["data"], "minival").annotation_file)
    raw = read_raw(smoke_run.dirs["detect"] / "raw_minival_flip.h5")
    assert after[-1].value == objective(evaluator, raw, after[-1].params)
    best = json.loads((out / "best.json").read_text())
    assert best["trials"] == more == result.metrics["trials"]
    assert best["AP"] == max(t.value for t in after)


def test_trial_left_running_by_a_kill_is_taken_up_with_its_own_params(smoke_run, tmp_path):
    cfg = smoke_run.cfg
    out = copy_artifact(smoke_run.dirs["tune"], tmp_path)
    (out / "manifest.json").unlink()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))
    study = optuna.load_study(study_name=tune_stage.STUDY_NAME, storage=storage)
    # The driver asked for a trial and was killed before telling its value.
    orphan = study.ask({"nms_iou": optuna.distributions.FloatDistribution(*cfg.tune.nms_iou),
                        "vote_iou": optuna.distributions.FloatDistribution(*cfg.tune.vote_iou)})
    assert orphan.number == cfg.tune.trials

    ctx = FakeContext(tmp_path)
    tune_stage.run(_with_trials(cfg, cfg.tune.trials + 2), _tune_inputs(smoke_run), out, ctx)

    trials = _journal_trials(out / "study.journal")
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * (cfg.tune.trials + 2)
    assert trials[orphan.number].params == orphan.params
    evaluated = [task["params"] for _, items in ctx.maps for task in items]
    assert evaluated == [orphan.params, trials[-1].params]
    assert trials[-1].params == tune_stage.trial_params(cfg.tune, seed=cfg.seed, number=orphan.number + 1)


@pytest.mark.parametrize("sampler", ["random", "sobol", "tpe"])
def test_a_study_killed_anywhere_ends_as_the_uninterrupted_one(smoke_run, tmp_path, sampler):
    """A SIGKILL leaves the journal cut at a record boundary (Optuna appends one
    record per write); cut it there, resume, and get the uninterrupted study."""
    cfg = dataclasses.replace(smoke_run.cfg, tune=dataclasses.replace(smoke_run.cfg.tune, sampler=sampler,
                                                                      trials=7, parallel=2))
    whole = tmp_path / "whole"
    whole.mkdir()
    tune_stage.run(cfg, _tune_inputs(smoke_run), whole, FakeContext(tmp_path))
    expected = [(t.number, t.params, t.value, t.state) for t in _journal_trials(whole / "study.journal")]
    lines = (whole / "study.journal").read_bytes().splitlines(keepends=True)
    for cut in (len(lines) * 2 // 5, len(lines) * 3 // 4 + 1):  # mid-study, in different batches
        killed = tmp_path / f"killed{cut}"
        killed.mkdir()
        (killed / "study.journal").write_bytes(b"".join(lines[:cut]))
        tune_stage.run(cfg, _tune_inputs(smoke_run), killed, FakeContext(tmp_path))
        resumed = [(t.number, t.params, t.value, t.state) for t in _journal_trials(killed / "study.journal")]
        assert resumed == expected, cut
        best = json.loads((killed / "best.json").read_text())
        assert best == json.loads((whole / "best.json").read_text())


def test_torn_journal_is_repaired_and_the_study_resumes(smoke_run, tmp_path):
    cfg = smoke_run.cfg
    out = copy_artifact(smoke_run.dirs["tune"], tmp_path)
    (out / "manifest.json").unlink()
    journal = out / "study.journal"
    whole = journal.read_bytes()
    journal.write_bytes(whole[:-7])  # a run killed while appending the last record

    tune_stage.run(cfg, _tune_inputs(smoke_run), out, FakeContext(tmp_path))

    trials = _journal_trials(journal)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * cfg.tune.trials
    assert json.loads((out / "best.json").read_text()) == json.loads(
        (smoke_run.dirs["tune"] / "best.json").read_text())


def test_damaged_journal_line_is_a_user_error(smoke_run, tmp_path):
    out = copy_artifact(smoke_run.dirs["tune"], tmp_path)
    journal = out / "study.journal"
    lines = journal.read_bytes().split(b"\n")
    journal.write_bytes(b"\n".join([lines[0], b"{not json", *lines[1:]]))
    with pytest.raises(UserError, match="study.journal: line 2 is not a journal record"):
        tune_stage.repair_journal(journal)


# ----------------------------------------------------------------------------- evaluate


def test_metrics_report_each_setting_separately(smoke_run):
    dirs = smoke_run.dirs
    metrics = json.loads((dirs["evaluate"] / "metrics.json").read_text())
    best = json.loads((dirs["tune"] / "best.json").read_text())
    assert set(metrics) == set(SETTINGS) | {"settings"}
    settings = metrics["settings"]
    tuned = dict(nms_iou=best["nms_iou"], score_thresh=best["score_thresh"], max_dets=best["max_dets"])
    assert settings["final"] == {"candidates": "flip", **tuned, "vote_iou": best["vote_iou"]}
    assert settings["no_flip"] == {"candidates": "plain", **tuned, "vote_iou": best["vote_iou"]}
    assert settings["no_voting"] == {"candidates": "flip", **tuned, "vote_iou": None}
    assert settings["baseline"] == {"candidates": "round1", "nms_iou": smoke_run.cfg.tune.baseline_nms_iou,
                                    "vote_iou": None}

    split = DetectionSplit.load(dirs["data"], smoke_run.cfg.evaluate.split)
    raw = {which: read_raw(dirs["detect"] / f"raw_{split.name}_{which}.h5")
           for which in ("plain", "round1", "flip")}
    detections = {}
    for name in SETTINGS:
        entry = metrics[name]
        assert list(entry["stats"]) == list(STAT_NAMES) and len(STAT_NAMES) == 12
        assert set(entry["per_category_ap"]) <= {split.categories.name(c) for c in split.categories.ids}
        params = {k: v for k, v in settings[name].items() if k != "candidates"}
        detections[name] = to_coco_results(apply_thresholds(raw[settings[name]["candidates"]], **params),
                                           split.categories)
        assert entry["stats"] == coco_eval(split.annotation_file, detections[name]).stats
    # Each switch changes the detections: the settings are measured, not copied.
    for name in ("no_flip", "no_voting", "baseline"):
        assert detections[name] != detections["final"]


def test_results_json_is_valid_coco_and_scores_as_reported(smoke_run):
    dirs = smoke_run.dirs
    split = DetectionSplit.load(dirs["data"], smoke_run.cfg.evaluate.split)
    path = dirs["evaluate"] / f"results_{split.name}.json"
    results = json.loads(path.read_text())
    assert results and set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    validate_results(results, split.annotation_file, source=str(path))
    loaded = COCO(str(split.annotation_file)).loadRes(str(path))
    assert len(loaded.getAnnIds()) == len(results)
    per_image = {}
    for r in results:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert max(per_image.values()) <= 100
    metrics = json.loads((dirs["evaluate"] / "metrics.json").read_text())
    assert coco_eval(split.annotation_file, path).stats == metrics["final"]["stats"]
    for plot in ("pr_curves.png", "ap_by_size.png", "detections.png"):
        assert (dirs["evaluate"] / "plots" / plot).stat().st_size > 0


def test_split_without_annotations_gets_submission_files(smoke_run, tmp_path):
    dirs = smoke_run.dirs
    data = without_test_annotations(dirs["data"], tmp_path / "data")
    out = tmp_path / "evaluate"
    out.mkdir()
    inputs = {"data": data, "detect": dirs["detect"], "tune": dirs["tune"]}
    result = evaluate_stage.run(smoke_run.cfg, inputs, out, FakeContext(tmp_path))

    name = f"detections_test-dev2015_{smoke_run.cfg.evaluate.algorithm}_results"
    expected = json.loads((dirs["evaluate"] / "results_test.json").read_text())
    with zipfile.ZipFile(out / f"{name}.zip") as archive:
        assert archive.namelist() == [f"{name}.json"]
        assert json.loads(archive.read(f"{name}.json")) == expected
    assert json.loads((out / "results_test.json").read_text()) == expected
    assert not (out / "metrics.json").exists()
    assert result.metrics == {"detections": float(len(expected))}
    assert "has no annotations" in result.summary[0] and f"{name}.zip" in result.summary[0]


def test_split_the_detect_stage_skipped_is_a_user_error(smoke_run, tmp_path):
    cfg, dirs = smoke_run.cfg, smoke_run.dirs
    # A detect output made with detect.splits = [test]: tune finds no minival candidates.
    detect = tmp_path / "detect"
    detect.mkdir()
    for path in dirs["detect"].glob("raw_test_*.h5"):
        os.symlink(path, detect / path.name)
    (tmp_path / "tune").mkdir()
    with pytest.raises(UserError, match=r"raw_minival_plain\.h5: no raw detections: the detect stage writes "
                                        r"them for each split in detect\.splits \(add the split there\), or "
                                        r"rerun it: python -m pipeline run --stages detect --force"):
        tune_stage.run(cfg, {"data": dirs["data"], "detect": detect}, tmp_path / "tune", FakeContext(tmp_path))
    # evaluate.split names a split detect did not run on.
    train = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, split="train"))
    (tmp_path / "evaluate").mkdir()
    with pytest.raises(UserError, match=r"raw_train_plain\.h5: no raw detections"):
        evaluate_stage.run(train, {"data": dirs["data"], "detect": dirs["detect"], "tune": dirs["tune"]},
                           tmp_path / "evaluate", FakeContext(tmp_path))
    assert not (tmp_path / "tune" / "study.journal").exists()


# ----------------------------------------------------------------------------- missing upstream


def _pipeline(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return subprocess.run([sys.executable, "-m", "pipeline", "run", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_tune_in_a_fresh_workdir_names_what_to_run(tmp_path):
    workdir = tmp_path / "fresh"
    config = str(SMOKE_CONFIG.relative_to(PROJECT_ROOT))
    done = _pipeline("--config", config, "--workdir", str(workdir), "--stages", "tune")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: stage 'tune' needs the output of ")
    assert "Traceback" not in done.stderr
    command = f"python -m pipeline run --config {config} --workdir {workdir}"
    assert f"run {command} --stages data,proposals,train,detect,tune (or --stages all)" in done.stderr
    # Nothing ran and no MLflow store was created; only the run's log, which holds the error too.
    assert [p.name for p in workdir.iterdir()] == ["logs"]
    (log,) = (workdir / "logs").iterdir()
    assert "error: stage 'tune' needs the output of " in log.read_text(encoding="utf-8")


@pytest.mark.parametrize(("stage", "missing", "present"), [
    ("tune", "detect", ("data", "proposals", "train")),
    ("evaluate", "tune", ("data", "proposals", "train", "detect")),
])
def test_missing_upstream_output_is_named(smoke_run, tmp_path, stage, missing, present):
    workdir = tmp_path / "work"
    for name in present:  # the finished upstream outputs, under their keys
        path = smoke_run.dirs[name]
        (workdir / "artifacts" / name).mkdir(parents=True)
        os.symlink(path, workdir / "artifacts" / name / path.name)
    config = str(SMOKE_CONFIG.relative_to(PROJECT_ROOT))
    done = _pipeline("--config", config, "--workdir", str(workdir), "--stages", stage)
    assert done.returncode == 2, done.stderr
    key = smoke_run.dirs[missing].name
    assert done.stderr == (f"error: stage {stage!r} needs the output of {missing!r} (key {key[:12]}) which is "
                           f"missing: run python -m pipeline run --config {config} --workdir {workdir} "
                           f"--stages {missing},{stage} (or --stages all)\n")
