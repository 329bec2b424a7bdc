"""The proposals stage on the smoke pipeline's outputs: one store per
source and split, mixes that respect their quotas, the recall report, and
resume after a simulated kill."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

import stages.proposals as proposals_stage
from ion.data.split import DetectionSplit
from proposals.recall import IOU_THRESHOLDS, load_ground_truth
from proposals.store import ProposalStore, ShardedWriter
from tests.helpers import FakeContext, copy_artifact

SPLITS = ("train", "minival", "test")
SOURCES = ("rpn1", "rpn2", "selective_search")


@pytest.fixture(scope="module")
def out(smoke_run):
    return smoke_run.dirs["proposals"]


@pytest.fixture(scope="module")
def splits(smoke_run):
    return {name: DetectionSplit.load(smoke_run.dirs["data"], name) for name in SPLITS}


def _store_content(path) -> dict:
    """Everything a store holds: attributes (counts, checksum, provenance) and each image's arrays."""
    with ProposalStore(path, verify=True) as store:
        items = {item[0]: item[1:] for item in store.iter_items(with_sources=bool(store.source_names))}
        return {"attrs": store.attrs, "image_ids": store.image_ids.tolist(), "items": items}


def _assert_same_content(a: dict, b: dict) -> None:
    assert a["attrs"] == b["attrs"] and a["image_ids"] == b["image_ids"]
    for image_id, arrays in a["items"].items():
        for x, y in zip(arrays, b["items"][image_id], strict=True):
            np.testing.assert_array_equal(x, y)


def test_every_source_store_covers_its_split(out, splits, smoke_run):
    for name, split in splits.items():
        ids = [r.image_id for r in split.images]
        for source in SOURCES:
            path = out / "sources" / f"{source}_{name}.h5"
            with ProposalStore(path, verify=True) as store:
                assert store.image_ids.tolist() == ids
                attrs = store.attrs
                assert (attrs["source"], attrs["split"], attrs["config_key"]) == (source, name, out.name)
                for record in split.images:
                    boxes, scores = store.get(record.image_id)
                    assert boxes.dtype == np.float32 and scores.dtype == np.float32 and len(boxes) > 0
                    assert (boxes[:, 2:] > boxes[:, :2]).all()
                    assert (boxes[:, :2] >= 0).all()
                    assert (boxes[:, 2] <= record.width).all() and (boxes[:, 3] <= record.height).all()
    limit = smoke_run.cfg.proposals.selective_search.max_boxes
    with ProposalStore(out / "sources" / "selective_search_test.h5") as store:
        assert store.attrs["boxes_per_image_max"] <= limit
    assert not list(out.rglob("*.tmp"))


def test_mixed_stores_respect_the_quotas_without_duplicates(out, splits, smoke_run):
    pcfg = smoke_run.cfg.proposals
    for name, split in splits.items():
        mix = pcfg.resolve_mix("train" if name == "train" else "test")
        sources = {s: ProposalStore(out / "sources" / f"{s}_{name}.h5") for s in mix}
        try:
            with ProposalStore(out / f"mixed_{name}.h5", verify=True) as mixed:
                assert mixed.image_ids.tolist() == [r.image_id for r in split.images]
                assert mixed.source_names == tuple(mix)
                assert mixed.attrs["top_k"] == dict(mix)
                for record in split.images:
                    boxes, scores = mixed.get(record.image_id)
                    column = mixed.get_sources(record.image_id)
                    assert len(np.unique(boxes, axis=0)) == len(boxes)  # no exact duplicates
                    expected_rows = set()
                    for s, (source, k) in enumerate(mix.items()):
                        own = column == s
                        assert own.sum() <= k
                        src_boxes, src_scores = sources[source].get(record.image_id)
                        top = np.argsort(-src_scores, kind="stable")[:k]
                        top_rows = {tuple(b) for b in src_boxes[top]}
                        # Each mixed box is one of its source's top-k, with that source's score.
                        for box, score in zip(boxes[own], scores[own]):
                            assert tuple(box) in top_rows
                            assert score in src_scores[np.all(src_boxes == box, axis=1)]
                        expected_rows |= top_rows
                    # De-duplication at IoU 1 drops exact repeats only: every top-k box is there once.
                    assert {tuple(b) for b in boxes} == expected_rows
        finally:
            for store in sources.values():
                store.close()


def test_recall_report_has_every_source_and_the_mix(out, splits, smoke_run):
    recall = json.loads((out / "recall.json").read_text())
    counts = smoke_run.cfg.proposals.recall.counts
    assert set(recall) == {"minival", "test"}  # annotated evaluation splits; train is skipped
    for name in ("minival", "test"):
        assert set(recall[name]) == set(SOURCES) | {"mix"}
        for source, entry in recall[name].items():
            assert set(counts) <= set(entry["counts"])
            ar = entry["average_recall"]["all"]
            assert len(ar) == len(entry["counts"]) and all(0.0 <= v <= 1.0 for v in ar)
            assert ar == sorted(ar)  # more proposals never recall less
        plot = out / "plots" / f"recall_{name}.png"
        with Image.open(plot) as image:
            assert image.format == "PNG" and image.size[0] > 100
    # The mix's AR at the largest count, recomputed here with torchvision's IoU.
    split = splits["minival"]
    ground_truth = load_ground_truth(split.annotation_file)
    top = max(counts)
    best = []
    with ProposalStore(out / "mixed_minival.h5") as mixed:
        for record in split.images:
            gt = ground_truth[record.image_id]
            keep = ~gt.iscrowd
            if not keep.any():
                continue
            proposals = torch.from_numpy(mixed.get(record.image_id)[0][:top]).double()
            iou = box_iou(torch.from_numpy(gt.boxes[keep]).double(), proposals)  # (G, P)
            best.append(iou.max(dim=1).values.numpy())
    best = np.concatenate(best)
    expected = float(np.mean([(best >= t).mean() for t in IOU_THRESHOLDS]))
    entry = recall["minival"]["mix"]
    assert entry["num_gt"]["all"] == len(best)
    assert entry["average_recall"]["all"][entry["counts"].index(top)] == pytest.approx(expected, abs=1e-12)


def _rebuild_parts(store_path, writer: ShardedWriter, lost: int) -> None:
    """The shard files a run killed before writing `store_path` would have left:
    every shard of `writer` but shard `lost`, taken from the finished store."""
    with ProposalStore(store_path) as store:
        items = {item[0]: item for item in store.iter_items()}
    for shard in writer.shards:
        if shard.index != lost:
            writer.write(shard, [items[i] for i in shard.image_ids])


def test_finished_groups_leave_no_shard_files(out):
    assert (out / "sources").is_dir() and not (out / "parts").exists()


def test_killed_run_recomputes_only_the_missing_shards(out, smoke_run, tmp_path, monkeypatch):
    monkeypatch.setattr(proposals_stage, "IMAGES_PER_SHARD", smoke_run.images_per_shard)
    copy = copy_artifact(out, tmp_path)
    (copy / "manifest.json").unlink()  # a killed stage leaves no manifest
    # Simulate a kill before these stores were written, with these shards lost:
    # shard 0 of the test split's RPN1 (RPN2's store was written before the kill)
    # and shard 1 of minival's selective search.
    ids = {name: [r.image_id for r in DetectionSplit.load(smoke_run.dirs["data"], name).images]
           for name in ("minival", "test")}
    lost = {("rpn1", "test"): 0, ("selective_search", "minival"): 1}
    writers = {}
    for (source, split), index in lost.items():
        writer = ShardedWriter(copy / "parts" / f"{source}_{split}", ids[split],
                               images_per_shard=smoke_run.images_per_shard)
        assert len(writer.shards) >= 2
        writers[source, split] = writer
        _rebuild_parts(copy / "sources" / f"{source}_{split}.h5", writer, index)
        (copy / "sources" / f"{source}_{split}.h5").unlink()
    rpn2_before = _store_content(copy / "sources" / "rpn2_test.h5")
    mtime_rpn2 = (copy / "sources" / "rpn2_test.h5").stat().st_mtime_ns

    ctx = FakeContext(tmp_path)
    proposals_stage.run(smoke_run.cfg, {"data": smoke_run.dirs["data"]}, copy, ctx)

    assert not any("rpn_loss" in metrics for metrics, _ in ctx.metrics)  # rpn.pt was kept, not retrained
    tasks = [task for fn, items in ctx.maps for task in items]
    assert all(fn is proposals_stage.compute_shard for fn, _ in ctx.maps)
    assert sorted((t.group, t.split, t.shard.index) for t in tasks) == [
        ("rpn", "test", 0), ("selective_search", "minival", 1)]
    assert not (copy / "parts").exists()  # the stores are written: their shards are gone
    # The RPN recomputes bit for bit: the resumed stores equal the uninterrupted run's.
    _assert_same_content(_store_content(copy / "sources" / "rpn1_test.h5"),
                         _store_content(out / "sources" / "rpn1_test.h5"))
    assert (copy / "sources" / "rpn2_test.h5").stat().st_mtime_ns == mtime_rpn2  # it was complete
    _assert_same_content(_store_content(copy / "sources" / "rpn2_test.h5"), rpn2_before)
    # Selective search ranks its boxes with libc rand(), which Ray's own threads also
    # draw from, so a recomputed image's boxes may differ from the first run's: the
    # surviving shard's images must be unchanged, the recomputed ones complete.
    resumed = _store_content(copy / "sources" / "selective_search_minival.h5")
    first = _store_content(out / "sources" / "selective_search_minival.h5")
    assert resumed["image_ids"] == first["image_ids"]
    recomputed_ids = set(writers["selective_search", "minival"].shards[1].image_ids)
    for image_id, (boxes, scores) in resumed["items"].items():
        if image_id in recomputed_ids:
            np.testing.assert_array_equal(scores, first["items"][image_id][1])
            assert len(np.unique(boxes, axis=0)) == len(boxes)
        else:
            np.testing.assert_array_equal(boxes, first["items"][image_id][0])
            np.testing.assert_array_equal(scores, first["items"][image_id][1])
    assert not list(copy.rglob("*.tmp"))


def test_stores_written_before_a_kill_during_cleanup_are_kept(out, smoke_run, tmp_path, monkeypatch):
    # A kill after the stores were written but while their shard folders were being
    # deleted leaves some shard files: the stores mark the work done, nothing reruns.
    monkeypatch.setattr(proposals_stage, "IMAGES_PER_SHARD", smoke_run.images_per_shard)
    copy = copy_artifact(out, tmp_path)
    (copy / "manifest.json").unlink()
    ids = [r.image_id for r in DetectionSplit.load(smoke_run.dirs["data"], "test").images]
    writer = ShardedWriter(copy / "parts" / "rpn1_test", ids, images_per_shard=smoke_run.images_per_shard)
    _rebuild_parts(copy / "sources" / "rpn1_test.h5", writer, lost=1)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (copy / "sources").iterdir()}

    ctx = FakeContext(tmp_path)
    proposals_stage.run(smoke_run.cfg, {"data": smoke_run.dirs["data"]}, copy, ctx)

    assert ctx.maps == []
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "sources").iterdir()} == mtimes
