"""The detect stage's shard files: deleted once a split's raw stores are
written, and a run killed before that resumes from them."""
from __future__ import annotations

import json

import numpy as np

import stages.detect as detect_stage
import stages.evaluate as evaluate_stage
from ion.data.split import DetectionSplit
from proposals.store import ProposalStore, ShardedWriter
from tests.helpers import FakeContext, copy_artifact, without_test_annotations

SETS = ("plain", "round1", "flip")


def _content(path) -> dict:
    with ProposalStore(path, verify=True) as store:
        return {"attrs": store.attrs,
                "items": {item[0]: item[1:] for item in store.iter_items(with_sources=True)}}


def _inputs(smoke_run) -> dict:
    return {name: smoke_run.dirs[name] for name in ("data", "proposals", "train")}


def test_finished_splits_leave_no_shard_files(smoke_run):
    out = smoke_run.dirs["detect"]
    assert (out / "raw_minival_plain.h5").is_file() and not (out / "parts").exists()


def test_killed_run_recomputes_only_the_missing_shards(smoke_run, tmp_path):
    cfg, dirs = smoke_run.cfg, smoke_run.dirs
    copy = copy_artifact(dirs["detect"], tmp_path)
    (copy / "manifest.json").unlink()  # a killed stage leaves no manifest
    # A kill after minival's shard 0 was saved and the plain store written, before
    # the round1 and flip stores: the last shard is lost.
    ids = [r.image_id for r in DetectionSplit.load(dirs["data"], "minival").images]
    for which in ("round1", "flip"):
        writer = ShardedWriter(copy / "parts" / f"{which}_minival", ids,
                               images_per_shard=cfg.detect.images_per_task)
        assert len(writer.shards) >= 2
        lost = writer.shards[-1].index
        with ProposalStore(copy / f"raw_minival_{which}.h5") as store:
            items = {item[0]: item for item in store.iter_items(with_sources=True)}
        for shard in writer.shards:
            if shard.index != lost:
                writer.write(shard, [items[i] for i in shard.image_ids])
        (copy / f"raw_minival_{which}.h5").unlink()
    plain_mtime = (copy / "raw_minival_plain.h5").stat().st_mtime_ns

    ctx = FakeContext(tmp_path)
    detect_stage.run(cfg, _inputs(smoke_run), copy, ctx)

    tasks = [task for fn, items in ctx.maps for task in items]
    assert [(t.split, t.shard.index) for t in tasks] == [("minival", lost)]
    assert (copy / "raw_minival_plain.h5").stat().st_mtime_ns == plain_mtime  # its store was written
    for which in SETS:  # the detector recomputes bit for bit on the CPU
        resumed = _content(copy / f"raw_minival_{which}.h5")
        first = _content(dirs["detect"] / f"raw_minival_{which}.h5")
        assert resumed["attrs"] == first["attrs"] and list(resumed["items"]) == list(first["items"])
        for image_id, arrays in first["items"].items():
            for x, y in zip(resumed["items"][image_id], arrays, strict=True):
                np.testing.assert_array_equal(x, y)
    assert not (copy / "parts").exists()
    assert not list(copy.rglob("*.tmp"))


def test_stores_written_before_a_kill_during_cleanup_are_kept(smoke_run, tmp_path):
    # Killed while deleting the shard folders: the written stores mark every set done.
    cfg, dirs = smoke_run.cfg, smoke_run.dirs
    copy = copy_artifact(dirs["detect"], tmp_path)
    (copy / "manifest.json").unlink()
    ids = [r.image_id for r in DetectionSplit.load(dirs["data"], "test").images]
    writer = ShardedWriter(copy / "parts" / "flip_test", ids, images_per_shard=cfg.detect.images_per_task)
    with ProposalStore(copy / "raw_test_flip.h5") as store:
        items = {item[0]: item for item in store.iter_items(with_sources=True)}
    writer.write(writer.shards[0], [items[i] for i in writer.shards[0].image_ids])
    mtimes = {p.name: p.stat().st_mtime_ns for p in copy.glob("raw_*.h5")}

    ctx = FakeContext(tmp_path)
    result = detect_stage.run(cfg, _inputs(smoke_run), copy, ctx)

    assert ctx.maps == []
    assert {p.name: p.stat().st_mtime_ns for p in copy.glob("raw_*.h5")} == mtimes
    assert all("all shards cached" in line for line in result.summary)
    with ProposalStore(copy / "raw_minival_plain.h5") as store:
        per_image = store.attrs["num_boxes"] / len(store)
    assert result.metrics["minival_candidates_per_image"] == per_image


def test_split_without_annotations_reads_only_the_final_candidates(smoke_run, tmp_path):
    # Test-dev writes the final setting alone: the other settings' candidate sets
    # (unflipped, round 1) are not read, so a detect output without them serves.
    dirs = smoke_run.dirs
    data = without_test_annotations(dirs["data"], tmp_path / "data")
    detect = tmp_path / "detect"
    detect.mkdir()
    (detect / "raw_test_flip.h5").symlink_to(dirs["detect"] / "raw_test_flip.h5")
    out = tmp_path / "evaluate"
    out.mkdir()
    cfg = smoke_run.cfg
    assert cfg.evaluate.split == "test"
    evaluate_stage.run(cfg, {"data": data, "detect": detect, "tune": dirs["tune"]}, out, FakeContext(tmp_path))
    assert json.loads((out / "results_test.json").read_text()) == \
        json.loads((dirs["evaluate"] / "results_test.json").read_text())
