"""Mixing: top-k per source, rank-interleaved order, de-duplication."""
import numpy as np
import pytest

from proposals.mix import first_non_overlapping, first_unique, mix_image, mix_stores, top_k_by_score
from proposals.store import ProposalStore, write_store


def box(i, size=10.0):
    return [10.0 * i, 0.0, 10.0 * i + size, size]


# Source 0 (e.g. rpn1), quota 2: boxes a0..a3.
A_BOXES = np.array([box(0), box(1), box(2), box(3)], np.float32)
A_SCORES = np.array([0.1, 0.9, 0.5, 0.7], np.float32)
# Source 1 (e.g. mcg), quota 4: boxes b0..b4; b2 equals a3 exactly.
B_BOXES = np.array([box(20), box(21), box(3), box(23), box(24)], np.float32)
B_SCORES = np.array([0.3, 0.8, 0.6, 0.2, 0.9], np.float32)


def test_top_k_by_score_is_stable():
    assert top_k_by_score(np.array([0.5, 0.9, 0.5, 0.1], np.float32), 3).tolist() == [1, 0, 2]
    assert top_k_by_score(np.array([0.5], np.float32), 3).tolist() == [0]


def test_mix_takes_top_k_per_source_interleaves_by_rank_and_drops_duplicates():
    boxes, scores, sources = mix_image([(A_BOXES, A_SCORES), (B_BOXES, B_SCORES)], [2, 4])
    # top-2 of A: a1, a3; top-4 of B: b4, b1, b2, b0. Positions rank / quota:
    # a1 0, b4 0, b1 .25, a3 .5, b2 .5, b0 .75; b2 (= a3, later) is a duplicate.
    np.testing.assert_array_equal(boxes, np.array([box(1), box(24), box(21), box(3), box(20)], np.float32))
    np.testing.assert_array_equal(scores, np.array([0.9, 0.9, 0.8, 0.7, 0.3], np.float32))
    assert sources.dtype == np.int8 and sources.tolist() == [0, 1, 1, 0, 1]


def test_first_n_of_a_mix_holds_each_source_in_proportion():
    rng = np.random.default_rng(0)
    per_source = []
    for _ in range(2):
        xy = rng.uniform(0, 100, (3000, 2))
        boxes = np.concatenate([xy, xy + 5], 1).astype(np.float32)
        per_source.append((boxes, rng.random(3000).astype(np.float32)))
    _, _, sources = mix_image(per_source, [1000, 2000])
    assert len(sources) == 3000
    first = sources[:300]
    assert (first == 0).sum() == 100 and (first == 1).sum() == 200


def test_dedup_iou_drops_near_duplicates_in_mix_order():
    near = np.array([[0, 0, 100, 100], [0, 0, 100, 96], [0, 0, 100, 60]], np.float32)  # IoU 0.96 and 0.6
    keep_exact, _, _ = mix_image([(near, np.array([3, 2, 1], np.float32))], [10], dedup_iou=1.0)
    assert len(keep_exact) == 3
    keep_near, _, _ = mix_image([(near, np.array([3, 2, 1], np.float32))], [10], dedup_iou=0.95)
    np.testing.assert_array_equal(keep_near, near[[0, 2]])
    assert first_non_overlapping(near, 0.5).tolist() == [0]
    assert first_non_overlapping(np.zeros((0, 4), np.float32), 0.5).tolist() == []


def test_first_unique_keeps_first_occurrence_and_equates_signed_zero():
    boxes = np.array([[1, 1, 2, 2], [-0.0, 0, 3, 3], [1, 1, 2, 2], [0, 0, 3, 3]], np.float32)
    assert first_unique(boxes).tolist() == [0, 1]


@pytest.mark.parametrize("seed", range(5))
def test_first_unique_equals_numpy_unique_rows(seed):
    # The definition it replaces: first occurrence of each distinct row (np.unique
    # over rows), ascending; random boxes with many repeats, signed zeros, a
    # float32 value that differs from its neighbour only in the last bit.
    rng = np.random.default_rng(seed)
    distinct = rng.integers(-3, 40, size=(200, 4)).astype(np.float32)
    distinct[:5] = np.nextafter(distinct[:5], np.float32(np.inf))
    distinct[rng.random(distinct.shape) < 0.05] = -0.0
    boxes = distinct[rng.integers(0, len(distinct), size=1500)]  # (1500, 4)
    _, first = np.unique(boxes + np.float32(0.0), axis=0, return_index=True)
    kept = first_unique(boxes)
    assert kept.dtype == np.int64
    np.testing.assert_array_equal(kept, np.sort(first))
    np.testing.assert_array_equal(first_unique(boxes[:1]), [0])


def test_empty_sources():
    empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
    boxes, scores, sources = mix_image([empty, (A_BOXES, A_SCORES)], [5, 1])
    np.testing.assert_array_equal(boxes, A_BOXES[[1]])
    assert sources.tolist() == [1]
    boxes, _, _ = mix_image([empty, empty], [5, 5])
    assert boxes.shape == (0, 4)


def test_mix_stores_equals_per_image_mix(tmp_path):
    rng = np.random.default_rng(1)
    stores = {}
    for name in ("rpn1", "mcg"):
        items = []
        for image_id in (3, 5, 8):
            xy = rng.integers(0, 50, (30, 2)).astype(np.float32)
            items.append((image_id, np.concatenate([xy, xy + 4], 1), rng.random(30).astype(np.float32)))
        stores[name] = ProposalStore(write_store(tmp_path / f"{name}.h5", items, {"source": name}))
    top_k = {"rpn1": 10, "mcg": 20}
    items = list(mix_stores(stores, top_k, [3, 5, 8]))
    path = write_store(tmp_path / "mix.h5", items, {"source": "mix", "source_names": list(top_k)})
    with ProposalStore(path, verify=True) as mixed:
        assert mixed.source_names == ("rpn1", "mcg")
        for image_id in (3, 5, 8):
            expected = mix_image([stores["rpn1"].get(image_id), stores["mcg"].get(image_id)], [10, 20])
            boxes, scores = mixed.get(image_id)
            np.testing.assert_array_equal(boxes, expected[0])
            np.testing.assert_array_equal(scores, expected[1])
            np.testing.assert_array_equal(mixed.get_sources(image_id), expected[2])
            assert len(boxes) <= 30
    for store in stores.values():
        store.close()


def test_config_resolves_the_bottom_up_role():
    from proposals.config import McgConfig, MixConfig, ProposalsConfig

    embedded = ProposalsConfig()
    assert embedded.resolve_mix("train") == {"rpn1": 1000, "selective_search": 1000}
    assert embedded.resolve_mix("test") == {"rpn2": 1000, "selective_search": 2000}
    coco = ProposalsConfig(bottom_up="mcg", mcg=McgConfig(dir="/data/mcg"))
    assert coco.resolve_mix("test") == {"rpn2": 1000, "mcg": 2000}
    assert coco.bottom_up_sources() == ("mcg", "selective_search")
    with pytest.raises(ValueError, match="mcg.dir is not set"):
        ProposalsConfig(bottom_up="mcg")
    with pytest.raises(ValueError, match="unknown sources"):
        MixConfig(train={"rpn3": 10})
