"""The HDF5 proposal store: exact round trip, random access, damaged and
foreign files, resumable shards."""
import os
import pickle

import h5py
import numpy as np
import pytest

from ion.errors import UserError
from proposals import store as store_module
from proposals.store import ProposalStore, ShardedWriter, assemble, read_shard, write_shard, write_store


def make_items(num_images=40, seed=0, max_boxes=300):
    rng = np.random.default_rng(seed)
    items = []
    for n in range(num_images):
        count = int(rng.integers(0, max_boxes))
        xy = rng.uniform(0, 500, (count, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(1, 100, (count, 2))], axis=1).astype(np.float32)
        scores = rng.random(count).astype(np.float32)
        items.append((1000 + 7 * n, boxes, scores))
    return items


def test_round_trip_is_exact_and_keeps_order_and_attrs(tmp_path):
    items = make_items()
    path = write_store(tmp_path / "s.h5", items, {"source": "rpn1", "config_key": "abc",
                                                   "counts": {"train": 40}})
    with ProposalStore(path, verify=True) as store:
        assert len(store) == len(items)
        assert store.image_ids.tolist() == [item[0] for item in items]
        for image_id, boxes, scores in items:
            got_boxes, got_scores = store.get(image_id)
            assert got_boxes.dtype == np.float32 and got_scores.dtype == np.float32
            np.testing.assert_array_equal(got_boxes, boxes)
            np.testing.assert_array_equal(got_scores, scores)
        scanned = list(store.iter_items(images_per_read=7))
        assert [s[0] for s in scanned] == [item[0] for item in items]
        for (_, b, s), (_, boxes, scores) in zip(scanned, items):
            np.testing.assert_array_equal(b, boxes)
            np.testing.assert_array_equal(s, scores)
        attrs = store.attrs
        assert attrs["source"] == "rpn1" and attrs["config_key"] == "abc"
        assert attrs["counts"] == {"train": 40}
        assert attrs["coordinates"] == "xyxy, 0-based continuous pixels"
        assert attrs["num_images"] == 40
        assert attrs["num_boxes"] == sum(len(item[1]) for item in items)
        assert attrs["checksum"].startswith("sha256:")
    assert not list(tmp_path.glob("*.tmp"))


def test_datasets_are_chunked_compressed_and_checksummed(tmp_path):
    path = write_store(tmp_path / "s.h5", make_items(5), {"source": "mcg"})
    with h5py.File(path, "r") as f:
        for name in ("boxes", "scores"):
            assert f[name].chunks is not None
            assert f[name].compression == store_module.COMPRESSION
            assert f[name].fletcher32


def test_random_access_reads_only_the_image_rows(tmp_path, monkeypatch):
    items = make_items(30)
    path = write_store(tmp_path / "s.h5", items, {"source": "rpn2"})
    with ProposalStore(path) as store:
        # Every read goes through h5py slicing; record the rows asked for.
        requested = []
        original = store._read
        monkeypatch.setattr(store, "_read",
                            lambda name, rows: requested.append((name, rows)) or original(name, rows))
        image_id, boxes, _ = items[17]
        got, _ = store.get(image_id)
        np.testing.assert_array_equal(got, boxes)
        start = sum(len(item[1]) for item in items[:17])
        rows = slice(start, start + len(boxes))
        assert requested == [("boxes", rows), ("scores", rows)]
        assert store.num_boxes(image_id) == len(boxes)
        assert image_id in store and 5 not in store
        with pytest.raises(KeyError, match="no proposals for image 5"):
            store.get(5)


def test_sources_column_round_trip(tmp_path):
    items = [(i, np.full((3, 4), i, np.float32), np.ones(3, np.float32), np.array([0, 1, 1], np.int8))
             for i in range(4)]
    path = write_store(tmp_path / "mix.h5", items, {"source": "mix", "source_names": ["rpn1", "mcg"]})
    with ProposalStore(path, verify=True) as store:
        assert store.source_names == ("rpn1", "mcg")
        assert store.get_sources(2).tolist() == [0, 1, 1]


def test_empty_images_and_empty_store(tmp_path):
    items = [(1, np.zeros((0, 4), np.float32), np.zeros(0, np.float32)),
             (2, np.ones((2, 4), np.float32), np.ones(2, np.float32))]
    with ProposalStore(write_store(tmp_path / "a.h5", items, {}), verify=True) as store:
        boxes, scores = store.get(1)
        assert boxes.shape == (0, 4) and scores.shape == (0,)
    with ProposalStore(write_store(tmp_path / "b.h5", [], {}), verify=True) as store:
        assert len(store) == 0 and list(store.iter_items()) == []


def test_bad_items_are_rejected_and_leave_no_file(tmp_path):
    with pytest.raises(ValueError, match="3 boxes but 2 scores"):
        write_store(tmp_path / "s.h5", [(1, np.zeros((3, 4)), np.zeros(2))], {})
    with pytest.raises(ValueError, match="appears twice"):
        write_store(tmp_path / "s.h5", [(1, np.zeros((1, 4)), np.zeros(1))] * 2, {})
    with pytest.raises(ValueError, match="set by the writer"):
        write_store(tmp_path / "s.h5", [], {"checksum": "x"})
    assert list(tmp_path.iterdir()) == []


def test_a_failing_writer_keeps_the_previous_store(tmp_path):
    path = write_store(tmp_path / "s.h5", make_items(3), {"source": "old"})

    def broken():
        yield from make_items(3, seed=1)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_store(path, broken(), {"source": "new"})
    with ProposalStore(path, verify=True) as store:
        assert store.attrs["source"] == "old"
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_file_is_detected(tmp_path):
    path = write_store(tmp_path / "s.h5", make_items(40), {"source": "rpn1"})
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(UserError) as err:
        ProposalStore(path)
    assert str(path) in str(err.value)
    assert "python -m pipeline run --stages proposals --force" in str(err.value)


def test_corrupted_bytes_fail_the_read_that_touches_them(tmp_path):
    items = make_items(40, max_boxes=400)
    path = write_store(tmp_path / "s.h5", items, {"source": "rpn1"})
    with h5py.File(path, "r") as f:
        offset = f["boxes"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as f:
        f.seek(offset + 100)
        chunk = bytearray(f.read(64))
        f.seek(offset + 100)
        f.write(bytes(b ^ 0xFF for b in chunk))
    store = ProposalStore(path)  # structure is intact: opening is cheap and succeeds
    with pytest.raises(UserError, match="cannot be read") as err:
        store.get(items[0][0])  # the first chunk holds the first image's boxes
    assert "--stages proposals --force" in str(err.value)
    store.close()
    with pytest.raises(UserError, match=str(path.name)):
        ProposalStore(path, verify=True)


def test_rewritten_values_fail_the_checksum(tmp_path):
    path = write_store(tmp_path / "s.h5", make_items(10), {"source": "rpn1"})
    with h5py.File(path, "r+") as f:  # a valid HDF5 edit: chunk checksums are recomputed
        f["scores"][3] = 42.0
    ProposalStore(path).close()
    with pytest.raises(UserError, match="checksum mismatch"):
        ProposalStore(path, verify=True)


def test_inconsistent_counts_are_detected(tmp_path):
    path = write_store(tmp_path / "s.h5", make_items(10), {"source": "rpn1"})
    with h5py.File(path, "r+") as f:
        f.attrs["num_boxes"] = int(f.attrs["num_boxes"]) + 1
    with pytest.raises(UserError, match="inconsistent counts"):
        ProposalStore(path)


def test_foreign_files_are_rejected(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["boxes"] = np.zeros((3, 4), np.float32)
    with pytest.raises(UserError, match="not a proposal store") as err:
        ProposalStore(foreign)
    assert str(foreign) in str(err.value)
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(UserError, match="not an HDF5 file"):
        ProposalStore(text)
    with pytest.raises(UserError, match="missing"):
        ProposalStore(tmp_path / "absent.h5")


def test_other_format_version_is_rejected(tmp_path):
    path = write_store(tmp_path / "s.h5", make_items(2), {})
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = store_module.FORMAT_VERSION + 1
    with pytest.raises(UserError, match="format version"):
        ProposalStore(path)


def test_store_pickles_by_path(tmp_path):
    items = make_items(3)
    path = write_store(tmp_path / "s.h5", items, {})
    with ProposalStore(path) as store:
        copy = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(copy.get(items[1][0])[0], items[1][1])
    copy.close()


def test_resume_after_a_simulated_kill_computes_only_missing_shards(tmp_path):
    items = make_items(23)
    by_id = {item[0]: item for item in items}
    image_ids = [item[0] for item in items]
    parts = tmp_path / "parts"
    computed = []

    def compute(image_id):
        computed.append(image_id)
        return by_id[image_id]

    writer = ShardedWriter(parts, image_ids, images_per_shard=5)
    assert len(writer.shards) == 5 and writer.shards[-1].image_ids == tuple(image_ids[20:])
    # The first run is killed after finishing shards 0 and 2, and in the middle of shard 3.
    for shard in (writer.shards[0], writer.shards[2]):
        writer.write(shard, [compute(i) for i in shard.image_ids])
    (parts / (writer.shards[3].file_name + ".tmp")).write_bytes(b"half a file")
    with pytest.raises(ValueError, match="3 of 5 shards"):
        list(writer.iter_items())

    computed.clear()
    resumed = ShardedWriter(parts, image_ids, images_per_shard=5)
    assert [s.index for s in resumed.pending()] == [1, 3, 4]
    for shard in resumed.pending():
        write_shard(parts, shard, [compute(i) for i in shard.image_ids])
    assert computed == image_ids[5:10] + image_ids[15:23]
    assert resumed.pending() == []

    path = assemble(resumed, tmp_path / "s.h5", {"source": "selective_search"})
    with ProposalStore(path, verify=True) as store:
        assert store.image_ids.tolist() == image_ids
        for image_id, boxes, scores in items:
            got_boxes, got_scores = store.get(image_id)
            np.testing.assert_array_equal(got_boxes, boxes)
            np.testing.assert_array_equal(got_scores, scores)


def test_shards_of_another_image_list_are_not_reused(tmp_path):
    items = make_items(6)
    writer = ShardedWriter(tmp_path, [i[0] for i in items], images_per_shard=3)
    writer.write(writer.shards[0], items[:3])
    other = ShardedWriter(tmp_path, [i[0] for i in items[1:]], images_per_shard=3)
    assert [s.index for s in other.pending()] == [0, 1]
    with pytest.raises(ValueError, match="expected"):
        writer.write(writer.shards[1], items[:3])
    with_sources = [(i, b, s, np.zeros(len(b), np.int8)) for i, b, s in items[3:]]
    write_shard(tmp_path, writer.shards[1], with_sources)
    assert all(len(item) == 4 for item in read_shard(tmp_path, writer.shards[1]))
    leftovers = [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert leftovers == []
