"""MCG import from MATLAB v5 and v7.3 files written here, as the MCG
distribution and MATLAB lay them out."""
import h5py
import numpy as np
import pytest
import scipy.io

from ion.errors import UserError
from proposals.mcg import clean_boxes, load_mcg_proposals, locate_mcg_files, mcg_yxyx1_to_xyxy, read_mcg_mat

WIDTH, HEIGHT = 100, 80
# MCG rows [y1, x1, y2, x2], 1-based inclusive, and their scores.
RAW_BOXES = np.array([
    [11, 21, 30, 60],   # -> [20, 10, 60, 30]
    [1, 1, 90, 120],    # -> [0, 0, 120, 90], clipped to [0, 0, 100, 80]
    [11, 21, 30, 60],   # duplicate of the first, lower score: dropped
    [5, 5, 5, 6],       # -> [4, 4, 6, 5]: 1 px tall, under min_size 2: dropped
    [41, 2, 80, 10],    # -> [1, 40, 10, 80]
], dtype=np.float64)
RAW_SCORES = np.array([0.5, 0.9, 0.1, 0.95, 0.7])
EXPECTED_BOXES = np.array([[0, 0, 100, 80], [1, 40, 10, 80], [20, 10, 60, 30]], dtype=np.float32)
EXPECTED_SCORES = np.array([0.9, 0.7, 0.5], dtype=np.float32)


def write_v5(path, fields):
    scipy.io.savemat(path, fields)


def write_v73(path, fields, struct=None):
    """A MATLAB v7.3 MAT-file: HDF5 with a 512-byte user block holding MATLAB's
    text header, arrays stored column-major (an N x 4 matrix as an HDF5 (4, N)
    dataset), each tagged with its MATLAB class; a struct is a group."""
    with h5py.File(path, "w", userblock_size=512) as f:
        group = f
        if struct is not None:
            group = f.create_group(struct)
            group.attrs["MATLAB_class"] = np.bytes_("struct")
        for name, value in fields.items():
            value = np.atleast_2d(np.asarray(value, dtype=np.float64))
            if value.size == 0:
                dataset = group.create_dataset(name, data=np.array(value.shape, dtype=np.uint64))
                dataset.attrs["MATLAB_empty"] = np.uint8(1)
            else:
                dataset = group.create_dataset(name, data=value.T)  # MATLAB (N, 4) -> HDF5 (4, N)
            dataset.attrs["MATLAB_class"] = np.bytes_("double")
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116, b" ") + b"\0" * 8 + b"\x00\x02" + b"IM")


def test_conversion_of_known_boxes():
    converted = mcg_yxyx1_to_xyxy(np.array([[11, 21, 30, 60]]))
    assert converted.dtype == np.float32
    # Rows 11..30 and columns 21..60 (1-based, inclusive) cover y in [10, 30), x in [20, 60).
    np.testing.assert_array_equal(converted, [[20, 10, 60, 30]])
    single_pixel = mcg_yxyx1_to_xyxy(np.array([[1, 1, 1, 1]]))
    np.testing.assert_array_equal(single_pixel, [[0, 0, 1, 1]])


def test_v5_file(tmp_path):
    path = tmp_path / "COCO_val2014_000000000042.mat"
    write_v5(path, {"boxes": RAW_BOXES, "scores": RAW_SCORES[:, None]})
    boxes, scores = read_mcg_mat(path)
    np.testing.assert_array_equal(boxes, RAW_BOXES)
    np.testing.assert_array_equal(scores, RAW_SCORES)
    boxes, scores = load_mcg_proposals(path, width=WIDTH, height=HEIGHT, min_size=2.0, top_n=2000)
    np.testing.assert_array_equal(boxes, EXPECTED_BOXES)
    np.testing.assert_array_equal(scores, EXPECTED_SCORES)


def test_v73_file_is_read_untransposed(tmp_path):
    path = tmp_path / "COCO_val2014_000000000042.mat"
    write_v73(path, {"boxes": RAW_BOXES, "scores": RAW_SCORES[:, None]})
    assert scipy.io.matlab.matfile_version(path) == (2, 0)  # scipy recognises MATLAB's v7.3 header
    with h5py.File(path, "r") as f:
        assert f["boxes"].shape == (4, 5)  # laid out as MATLAB writes it
    boxes, scores = read_mcg_mat(path)
    np.testing.assert_array_equal(boxes, RAW_BOXES)
    np.testing.assert_array_equal(scores, RAW_SCORES)
    boxes, scores = load_mcg_proposals(path, width=WIDTH, height=HEIGHT)
    np.testing.assert_array_equal(boxes, EXPECTED_BOXES)
    np.testing.assert_array_equal(scores, EXPECTED_SCORES)


def test_im2mcg_field_names_in_a_candidates_struct(tmp_path):
    v5 = tmp_path / "a.mat"
    write_v5(v5, {"candidates": {"bboxes": RAW_BOXES, "bboxes_scores": RAW_SCORES[:, None]}})
    v73 = tmp_path / "b.mat"
    write_v73(v73, {"bboxes": RAW_BOXES, "bboxes_scores": RAW_SCORES[:, None]}, struct="candidates")
    top = tmp_path / "c.mat"
    write_v5(top, {"bboxes": RAW_BOXES, "bboxes_scores": RAW_SCORES})
    for path in (v5, v73, top):
        boxes, scores = load_mcg_proposals(path, width=WIDTH, height=HEIGHT)
        np.testing.assert_array_equal(boxes, EXPECTED_BOXES)
        np.testing.assert_array_equal(scores, EXPECTED_SCORES)


def test_top_n_and_min_size():
    boxes = mcg_yxyx1_to_xyxy(RAW_BOXES)
    kept, scores = clean_boxes(boxes, RAW_SCORES, width=WIDTH, height=HEIGHT, min_size=2.0, top_n=2)
    np.testing.assert_array_equal(kept, EXPECTED_BOXES[:2])
    np.testing.assert_array_equal(scores, EXPECTED_SCORES[:2])
    kept, _ = clean_boxes(boxes, RAW_SCORES, width=WIDTH, height=HEIGHT, min_size=0.0, top_n=10)
    assert len(kept) == 4  # the 2 x 1 box stays, the duplicate still goes


def test_empty_files(tmp_path):
    v5 = tmp_path / "a.mat"
    write_v5(v5, {"boxes": np.zeros((0, 4)), "scores": np.zeros((0, 1))})
    v73 = tmp_path / "b.mat"
    write_v73(v73, {"boxes": np.zeros((0, 4)), "scores": np.zeros((0, 1))})
    for path in (v5, v73):
        boxes, scores = load_mcg_proposals(path, width=WIDTH, height=HEIGHT)
        assert boxes.shape == (0, 4) and scores.shape == (0,)


def test_file_without_mcg_fields(tmp_path):
    path = tmp_path / "x.mat"
    write_v5(path, {"something": np.zeros(3)})
    with pytest.raises(UserError, match=r"x\.mat.*fields \['something'\]"):
        read_mcg_mat(path)
    junk = tmp_path / "junk.mat"
    junk.write_bytes(b"not a mat file at all" * 20)
    with pytest.raises(UserError, match="junk.mat"):
        read_mcg_mat(junk)


def test_lookup_by_file_stem_and_by_image_id(tmp_path):
    sub = tmp_path / "MCG-COCO-val2014-boxes"
    sub.mkdir()
    for name in ("COCO_val2014_000000000042.mat", "COCO_val2014_000000000139.mat", "7.mat"):
        write_v5(sub / name, {"boxes": RAW_BOXES, "scores": RAW_SCORES})
    images = [(42, "COCO_val2014_000000000042.jpg"),   # by stem
              (139, "/coco/val2017/000000000139.jpg"),  # 2017 name: by id
              (7, "000000000007.jpg")]                  # unpadded id
    found = locate_mcg_files(tmp_path, images)
    assert found.missing == ()
    assert found.paths == {42: sub / "COCO_val2014_000000000042.mat",
                           139: sub / "COCO_val2014_000000000139.mat", 7: sub / "7.mat"}


def test_missing_files_are_listed(tmp_path):
    write_v5(tmp_path / "COCO_val2014_000000000001.mat", {"boxes": RAW_BOXES, "scores": RAW_SCORES})
    images = [(i, f"COCO_val2014_{i:012d}.jpg") for i in range(1, 13)]
    with pytest.raises(UserError) as err:
        locate_mcg_files(tmp_path, images)
    message = str(err.value)
    assert "11 of 12 images" in message
    assert "2 (COCO_val2014_000000000002.jpg)" in message and "11 (COCO_val2014_000000000011.jpg)" in message
    assert "12 (" not in message and "and 1 more" in message
    assert "allow_missing" in message and str(tmp_path) in message

    allowed = locate_mcg_files(tmp_path, images, allow_missing=True)
    assert allowed.missing == tuple(range(2, 13))
    assert allowed.paths[1] == tmp_path / "COCO_val2014_000000000001.mat"
    assert allowed.paths[5] is None


def test_missing_directory_and_ambiguous_ids(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        locate_mcg_files(tmp_path / "nope", [(1, "a.jpg")])
    for name in ("COCO_train2014_000000000005.mat", "COCO_val2014_000000000005.mat"):
        write_v5(tmp_path / name, {"boxes": RAW_BOXES, "scores": RAW_SCORES})
    with pytest.raises(UserError, match="several MCG files match image 5"):
        locate_mcg_files(tmp_path, [(5, "000000000005.jpg")])


@pytest.mark.parametrize("case", ["nan box", "inf score", "group for boxes", "damaged v73", "text scores",
                                  "truncated v5"])
def test_damaged_mcg_files_name_the_file(tmp_path, case):
    path = tmp_path / "COCO_val2014_000000000042.mat"
    boxes = np.array([[1, 1, 10, 10], [2, 2, 20, 20]], dtype=np.float64)
    if case == "nan box":
        boxes[1, 2] = np.nan
        write_v5(path, {"boxes": boxes, "scores": np.array([[0.9], [0.8]])})
        message = "1 NaN or infinite value\\(s\\) in the boxes"
    elif case == "inf score":
        write_v73(path, {"boxes": boxes, "scores": np.array([[0.9], [np.inf]])})
        message = "1 NaN or infinite value\\(s\\) in the scores"
    elif case == "group for boxes":
        write_v73(path, {"scores": np.array([[0.9], [0.8]])})
        with h5py.File(path, "r+") as f:
            f.create_group("boxes")
        message = "'boxes' is a Group, not a numeric array"
    elif case == "damaged v73":
        write_v73(path, {"boxes": boxes, "scores": np.array([[0.9], [0.8]])})
        data = path.read_bytes()
        path.write_bytes(data[:600])
        message = "damaged MATLAB v7.3|not a readable MATLAB file"
    elif case == "text scores":
        write_v5(path, {"boxes": boxes, "scores": np.array(["ab", "cd"])})
        message = "'scores' holds <U2, not numbers"
    else:
        write_v5(path, {"boxes": boxes, "scores": np.array([[0.9], [0.8]])})
        path.write_bytes(path.read_bytes()[:200])
        message = "not a readable MATLAB file"
    with pytest.raises(UserError, match=f"{path.name}: ({message})"):
        load_mcg_proposals(path, width=40, height=30)


def test_huge_mcg_arrays_are_refused_before_reading(tmp_path, monkeypatch):
    import proposals.mcg as mcg

    path = tmp_path / "big.mat"
    write_v73(path, {"boxes": np.ones((50, 4)), "scores": np.ones((50, 1))})
    monkeypatch.setattr(mcg, "MAX_VALUES", 100)  # the real limit is 50 million values; the rule is the same
    with pytest.raises(UserError, match="'boxes' holds 200 values, more than the 100"):
        load_mcg_proposals(path, width=40, height=30)


def test_symlinked_subfolders_are_read_and_duplicate_stems_named(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_v5(elsewhere / "COCO_val2014_000000000042.mat", {"boxes": RAW_BOXES, "scores": RAW_SCORES})
    mcg = tmp_path / "mcg"
    mcg.mkdir()
    (mcg / "val2014").symlink_to(elsewhere)
    (mcg / "loop").symlink_to(mcg)  # a link back up the tree is walked once
    found = locate_mcg_files(mcg, [(42, "COCO_val2014_000000000042.jpg")])
    assert found.paths == {42: mcg / "val2014" / "COCO_val2014_000000000042.mat"}
    (mcg / "copy").mkdir()
    write_v5(mcg / "copy" / "COCO_val2014_000000000042.mat", {"boxes": RAW_BOXES, "scores": RAW_SCORES})
    with pytest.raises(UserError) as err:
        locate_mcg_files(mcg, [(42, "COCO_val2014_000000000042.jpg")])
    assert str(mcg / "copy" / "COCO_val2014_000000000042.mat") in str(err.value)
    assert str(mcg / "val2014" / "COCO_val2014_000000000042.mat") in str(err.value)
