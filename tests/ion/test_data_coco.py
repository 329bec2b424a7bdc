"""COCO reading and validation, the paper's splits, image decoding and the category map."""
import copy
import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from pycocotools.coco import COCO

from ion.data.categories import CategoryMap
from ion.data.coco import ValidationReport, read_coco
from ion.data.coco_splits import build_coco_splits, minival_image_ids, read_id_list
from ion.data.images import load_image
from ion.data.split import ImageRecord, instance_masks
from ion.errors import UserError
from tests.helpers import png_header

EXIF_ORIENTATION_TAG = 0x0112


# ------------------------------------------------------------------ coco-mini


@pytest.fixture(scope="module")
def mini(shared_dir):
    root = shared_dir / "data" / "coco-mini"
    return {"root": root, "train_json": root / "annotations" / "instances_train2017.json",
            "val_json": root / "annotations" / "instances_val2017.json",
            "train_images": root / "train2017", "val_images": root / "val2017"}


def _read(annotation_file, image_dir, *, on_bad="error", report=None, **kwargs):
    return read_coco(annotation_file=annotation_file, image_dir=image_dir, on_bad=on_bad, box_tolerance=1.0,
                     check_image_files=True, report=report if report is not None else ValidationReport(),
                     **kwargs)


@pytest.mark.parametrize("split, images, annotations, crowd", [("train", 80, 739, 8), ("val", 79, 624, 5)])
def test_coco_mini_reads_whole_with_crowd_and_id_gaps(mini, split, images, annotations, crowd):
    report = ValidationReport()
    coco = _read(mini[f"{split}_json"], mini[f"{split}_images"], report=report)
    assert (len(coco["images"]), len(coco["annotations"])) == (images, annotations)
    crowds = [a for a in coco["annotations"] if a["iscrowd"]]
    assert len(crowds) == crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowds)
    ids = sorted(c["id"] for c in coco["categories"])
    assert len(ids) == 80 and ids[-1] == 90 and 12 not in ids  # COCO's ids, gaps kept
    assert report.metrics() == {}
    original = json.loads(mini[f"{split}_json"].read_text())
    assert coco["annotations"] == original["annotations"]  # nothing needed repair


def test_coco_mini_splits_paper_rules(mini):
    splits = build_coco_splits(
        train_annotations=mini["train_json"], train_images=mini["train_images"], val_annotations=mini["val_json"],
        val_images=mini["val_images"], minival_size=40, minival_ids_file=None, val_rest="test",
        test_annotations=None, test_image_info=None, test_images=None, on_bad="error", box_tolerance=1.0,
        check_image_files=True, report=ValidationReport())
    val_ids = sorted(img["id"] for img in json.loads(mini["val_json"].read_text())["images"])
    minival = {img["id"] for img in splits["minival"].coco["images"]}
    test = {img["id"] for img in splits["test"].coco["images"]}
    assert minival == set(val_ids[:40]) and test == set(val_ids[40:])
    assert len(splits["train"].coco["images"]) == 80
    assert splits["test"].has_annotations and splits["minival"].image_dir == mini["val_images"].resolve()
    assert all(a["image_id"] in test for a in splits["test"].coco["annotations"])


def _splits_with_test_dev(mini, tmp_path, *, val_rest: str) -> dict:
    """coco-mini's splits (30 val images as minival) with val2017 as a test-dev image-info file."""
    info = json.loads(mini["val_json"].read_text())
    del info["annotations"]
    info_file = tmp_path / "image_info_test-dev.json"
    info_file.write_text(json.dumps(info))
    return build_coco_splits(
        train_annotations=mini["train_json"], train_images=mini["train_images"], val_annotations=mini["val_json"],
        val_images=mini["val_images"], minival_size=30, minival_ids_file=None, val_rest=val_rest,
        test_annotations=None, test_image_info=info_file, test_images=mini["val_images"], on_bad="error",
        box_tolerance=1.0, check_image_files=True, report=ValidationReport())


def test_trainval_merge_and_test_dev_without_annotations(mini, tmp_path):
    """val_rest=train: train = train2017 + val2017 outside minival, file names relative to a common
    folder; test from an image-info file has no annotations key."""
    splits = _splits_with_test_dev(mini, tmp_path, val_rest="train")
    train = splits["train"]
    assert len(train.coco["images"]) == 80 + 49 and len(train.coco["annotations"]) > 739
    assert train.image_dir == mini["root"].resolve()
    assert all((train.image_dir / img["file_name"]).is_file() for img in train.coco["images"])
    assert {img["file_name"].split("/")[0] for img in train.coco["images"]} == {"train2017", "val2017"}
    assert "annotations" not in splits["test"].coco and not splits["test"].has_annotations
    assert len(splits["test"].coco["images"]) == 79


def test_val_rest_drop_trains_on_train_alone(mini, tmp_path):
    """val_rest=drop: the 'train' rows of Tables 3 and 11; the val images outside minival go nowhere."""
    splits = _splits_with_test_dev(mini, tmp_path, val_rest="drop")
    train_ids = {img["id"] for img in json.loads(mini["train_json"].read_text())["images"]}
    assert {img["id"] for img in splits["train"].coco["images"]} == train_ids
    assert len(splits["minival"].coco["images"]) == 30 and not splits["test"].has_annotations


def test_instance_masks_match_pycocotools(mini):
    coco = _read(mini["val_json"], mini["val_images"])
    reference = COCO(str(mini["val_json"]))
    by_image = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    crowd_image = next(a["image_id"] for a in coco["annotations"] if a["iscrowd"])
    for image_id in (crowd_image, coco["images"][0]["id"]):
        img = reference.imgs[image_id]
        anns = by_image[image_id]
        record = ImageRecord(image_id=image_id, path=mini["val_images"] / img["file_name"], width=img["width"],
                             height=img["height"], boxes=np.zeros((len(anns), 4), np.float32),
                             category_ids=np.array([a["category_id"] for a in anns]),
                             iscrowd=np.array([a["iscrowd"] for a in anns], bool),
                             segmentations=[a["segmentation"] for a in anns])
        masks = instance_masks(record)
        assert masks.shape == (len(anns), img["height"], img["width"]) and masks.dtype == bool
        for mask, ann in zip(masks, anns):
            assert np.array_equal(mask, reference.annToMask(reference.anns[ann["id"]]).astype(bool))
        assert record.load().shape == (img["height"], img["width"], 3)


def test_compressed_rle_mask():
    mask = np.zeros((6, 5), np.uint8)
    mask[1:4, 2:5] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode()  # as stored in json
    record = ImageRecord(image_id=1, path=None, width=5, height=6, boxes=np.zeros((1, 4), np.float32),
                         category_ids=np.array([1]), iscrowd=np.array([True]), segmentations=[rle])
    assert np.array_equal(instance_masks(record)[0], mask.astype(bool))


# ------------------------------------------------------------------ validation


def _tiny(tmp_path):
    """Two 40x30 JPEGs, three annotations, categories with a gap; bomb.png declares 20000x12000 pixels."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (40, 30), (90, 120, 150)).save(folder / name)
    (folder / "bomb.png").write_bytes(png_header(20000, 12000))
    square = [[5.0, 5.0, 15.0, 5.0, 15.0, 15.0, 5.0, 15.0]]
    return folder, {
        "images": [{"id": 10, "file_name": "a.jpg", "width": 40, "height": 30},
                   {"id": 20, "file_name": "b.jpg", "width": 40, "height": 30}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [5, 5, 10, 10], "area": 100.0, "iscrowd": 0,
             "segmentation": square},
            {"id": 2, "image_id": 10, "category_id": 7, "bbox": [20, 10, 8, 8], "area": 64.0, "iscrowd": 0,
             "segmentation": [[20, 10, 28, 10, 28, 18, 20, 18]]},
            {"id": 3, "image_id": 20, "category_id": 3, "bbox": [0, 0, 40, 30], "area": 1200.0, "iscrowd": 1,
             "segmentation": {"size": [30, 40], "counts": [0, 1200]}}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }


def _write(tmp_path, data, name="instances.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_tiny_dataset_is_valid_and_keeps_images_without_annotations(tmp_path):
    folder, data = _tiny(tmp_path)
    Image.new("RGB", (40, 30)).save(folder / "empty.jpg")
    data["images"].append({"id": 30, "file_name": "empty.jpg", "width": 40, "height": 30})
    coco = _read(_write(tmp_path, data), folder)
    assert coco["annotations"] == data["annotations"] and coco["images"] == data["images"]
    record = ImageRecord(image_id=30, path=folder / "empty.jpg", width=40, height=30,
                         boxes=np.zeros((0, 4), np.float32), category_ids=np.zeros(0, np.int64),
                         iscrowd=np.zeros(0, bool), segmentations=[])
    assert instance_masks(record).shape == (0, 30, 40)


BAD_CASES = {
    # name: (mutation of the tiny data set, message fragment, dropped reason, annotations kept in drop mode)
    "missing image file": (lambda d: d["images"][1].update(file_name="gone.jpg"),
                           r"images\[1\] \(id=20\): image file .*gone.jpg not found", "missing_image_file", 2),
    "image size differs": (lambda d: d["images"][0].update(width=41),
                           r"images\[0\] \(id=10\): .*is 40x30 pixels but its annotation says width=41",
                           "bad_image_file", 1),
    "duplicate image id": (lambda d: d["images"][1].update(id=10),
                           r"images\[0\] \(id=10\): image id 10 is used by 2 entries", "duplicate_image_id", 0),
    "box outside image": (lambda d: d["annotations"][1].update(bbox=[35, 10, 8, 8]),
                          r"annotations\[1\] \(id=2\): bbox \[35, 10, 8, 8\] leaves image 10 \(40x30\)",
                          "box_outside_image", 2),
    "non-positive size": (lambda d: d["annotations"][0].update(bbox=[5, 5, 0, 10]),
                          r"annotations\[0\] \(id=1\): bbox \[5, 5, 0, 10\] has width or height <= 0",
                          "non_positive_box", 2),
    "unknown category": (lambda d: d["annotations"][1].update(category_id=5),
                         r"annotations\[1\] \(id=2\): category_id 5 is not in categories", "unknown_category_id", 2),
    "duplicate annotation id": (lambda d: d["annotations"][1].update(id=1),
                                r"annotations\[1\] \(id=1\): annotation id 1 appears again",
                                "duplicate_annotation_id", 2),
    "unknown image id": (lambda d: d["annotations"][1].update(image_id=99),
                         r"annotations\[1\] \(id=2\): image_id 99 is not in images", "unknown_image_id", 2),
    "bad crowd RLE": (lambda d: d["annotations"][2]["segmentation"].update(size=[30, 41]),
                      r"annotations\[2\] \(id=3\): RLE size \[30, 41\] differs", "bad_segmentation", 2),
    "RLE size an int": (lambda d: d["annotations"][2]["segmentation"].update(size=30),
                        r"annotations\[2\] \(id=3\): RLE size must be a list of 2 integers", "bad_segmentation", 2),
    "RLE counts short": (lambda d: d["annotations"][2]["segmentation"].update(counts=[0, 1000]),
                         r"annotations\[2\] \(id=3\): RLE counts sum to 1000, not height \* width = 1200",
                         "bad_segmentation", 2),
    "RLE counts negative": (lambda d: d["annotations"][2]["segmentation"].update(counts=[1300, -100]),
                            r"RLE counts must be non-negative integers", "bad_segmentation", 2),
    "RLE counts bad string": (lambda d: d["annotations"][2]["segmentation"].update(counts="{~~}"),
                              r"compressed RLE counts hold characters outside", "bad_segmentation", 2),
    "RLE counts a number": (lambda d: d["annotations"][2]["segmentation"].update(counts=1200),
                            r"RLE counts must be a list of integers or a compressed string, got int",
                            "bad_segmentation", 2),
    "decompression bomb": (lambda d: d["images"][1].update(file_name="bomb.png", width=20000, height=12000),
                           r"images\[1\] \(id=20\): .*bomb.png: Image size \(240000000 pixels\) exceeds limit",
                           "bad_image_file", 2),
    "bad bbox": (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]),
                 r"annotations\[0\] \(id=1\): bbox must be 4 finite numbers", "bad_bbox", 2),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_entries_raise_or_are_dropped(tmp_path, case):
    mutate, message, reason, kept = BAD_CASES[case]
    folder, data = _tiny(tmp_path)
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(UserError, match=message) as err:
        _read(path, folder)
    assert str(err.value).startswith(f"{path}: ") and "on_bad_annotation: drop" in str(err.value)
    report = ValidationReport()
    coco = _read(path, folder, on_bad="drop", report=report)
    assert report.dropped[reason] >= 1
    assert f"dropped_{reason}" in report.metrics()
    assert len(coco["annotations"]) == kept


def test_dropped_images_take_their_annotations(tmp_path):
    folder, data = _tiny(tmp_path)
    data["images"][0]["file_name"] = "gone.jpg"
    report = ValidationReport()
    coco = _read(_write(tmp_path, data), folder, on_bad="drop", report=report)
    assert [img["id"] for img in coco["images"]] == [20]
    assert report.dropped == {"missing_image_file": 1, "annotations_of_dropped_images": 2}


def test_image_checks_spread_over_a_pool_find_what_a_serial_pass_finds(tmp_path, monkeypatch):
    # Many images, some missing, mis-sized or duplicated, checked in chunks of 3 by two
    # worker processes: the same kept images, counts, examples and first error.
    from concurrent.futures import ProcessPoolExecutor

    import ion.data.coco as coco_module
    folder, data = _tiny(tmp_path)
    for k in range(20):
        name = f"x{k}.jpg"
        if k % 5 != 1:
            Image.new("RGB", (40, 30)).save(folder / name)
        data["images"].append({"id": 100 + k, "file_name": name, "width": 41 if k % 7 == 3 else 40,
                               "height": 30})
    data["images"].append({"id": 105, "file_name": "a.jpg", "width": 40, "height": 30})
    path = _write(tmp_path, data)
    serial_report = ValidationReport()
    serial = _read(path, folder, on_bad="drop", report=serial_report)
    with pytest.raises(UserError) as serial_error:
        _read(path, folder)
    monkeypatch.setattr(coco_module, "IMAGES_PER_CHECK", 3)
    with ProcessPoolExecutor(2) as pool:
        def map_fn(fn, items):
            return list(pool.map(fn, items))
        pooled_report = ValidationReport()
        pooled = _read(path, folder, on_bad="drop", report=pooled_report, map_fn=map_fn)
        with pytest.raises(UserError) as pooled_error:
            _read(path, folder, map_fn=map_fn)
    assert pooled == serial and len(serial["images"]) < len(data["images"])
    assert pooled_report == serial_report
    assert set(serial_report.dropped) == {"missing_image_file", "bad_image_file", "duplicate_image_id"}
    assert str(pooled_error.value) == str(serial_error.value)


def test_box_slightly_outside_is_clipped(tmp_path):
    folder, data = _tiny(tmp_path)
    data["annotations"][1]["bbox"] = [33.5, 10, 7, 21]  # 0.5 px right, 1 px below
    report = ValidationReport()
    coco = _read(_write(tmp_path, data), folder, report=report)
    assert coco["annotations"][1]["bbox"] == [33.5, 10.0, 6.5, 20.0]
    assert report.repaired["boxes_clipped"] == 1


def test_missing_segmentation_and_area_are_filled_in(tmp_path):
    folder, data = _tiny(tmp_path)
    del data["annotations"][0]["segmentation"], data["annotations"][0]["area"]
    data["annotations"][1]["segmentation"].append([1, 2, 3, 4])  # a degenerate polygon
    report = ValidationReport()
    coco = _read(_write(tmp_path, data), folder, report=report)
    assert coco["annotations"][0]["segmentation"] == [[5.0, 5.0, 15.0, 5.0, 15.0, 15.0, 5.0, 15.0]]
    assert coco["annotations"][0]["area"] == 100.0
    assert coco["annotations"][1]["segmentation"] == [[20, 10, 28, 10, 28, 18, 20, 18]]
    assert report.repaired == {"segmentation_from_box": 1, "area_computed": 1, "degenerate_polygons_removed": 1}


def test_structural_problems_are_always_errors(tmp_path):
    folder, data = _tiny(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(UserError, match=r"broken.json: not valid JSON: .* line 1"):
        _read(broken, folder, on_bad="drop")
    with pytest.raises(UserError, match=r"missing.json: no such file"):
        _read(tmp_path / "missing.json", folder)
    no_anns = {k: v for k, v in data.items() if k != "annotations"}
    with pytest.raises(UserError, match="has no annotations .*test_image_info"):
        _read(_write(tmp_path, no_anns), folder)
    assert "annotations" not in _read(_write(tmp_path, no_anns), folder, annotations_required=False)
    dup = copy.deepcopy(data)
    dup["categories"][1]["id"] = 3
    with pytest.raises(UserError, match=r"categories\[1\]: category id 3 appears twice"):
        _read(_write(tmp_path, dup), folder, on_bad="drop")
    with pytest.raises(UserError, match="image folder not found"):
        _read(_write(tmp_path, data), tmp_path / "nowhere")


def test_minival_ids(tmp_path):
    ids = [9, 3, 5, 1, 7]
    assert minival_image_ids(val_image_ids=ids, minival_size=2, ids_file=None) == {1, 3}
    with pytest.raises(UserError, match="minival_size: 5 would hold out all 5 val images"):
        minival_image_ids(val_image_ids=ids, minival_size=5, ids_file=None)
    (tmp_path / "ids.txt").write_text("7\n9\n")
    (tmp_path / "ids.json").write_text("[5, 1]")
    (tmp_path / "minival.json").write_text(json.dumps({"images": [{"id": 3}], "annotations": []}))
    assert read_id_list(tmp_path / "ids.txt") == [7, 9]
    assert minival_image_ids(val_image_ids=ids, minival_size=2, ids_file=tmp_path / "ids.json") == {1, 5}
    assert minival_image_ids(val_image_ids=ids, minival_size=2, ids_file=tmp_path / "minival.json") == {3}
    (tmp_path / "bad.txt").write_text("7\n42\n")
    with pytest.raises(UserError, match=r"bad.txt: 1 minival ids are not val images, e.g. \[42\]"):
        minival_image_ids(val_image_ids=ids, minival_size=2, ids_file=tmp_path / "bad.txt")


# ------------------------------------------------------------------ images


def test_grey_cmyk_palette_rgba_and_16bit_images_become_rgb(tmp_path):
    grey = tmp_path / "grey.jpg"
    Image.new("L", (8, 6), 77).save(grey, quality=100)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(cmyk, quality=100)  # pure red
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 6), (10, 200, 30, 255)).save(rgba)
    palette = tmp_path / "palette.png"
    Image.new("RGB", (8, 6), (40, 50, 60)).convert("P").save(palette)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((6, 8), 65535, np.uint16)).save(deep)
    for path in (grey, cmyk, rgba, palette, deep):
        image = load_image(path)
        assert image.shape == (6, 8, 3) and image.dtype == np.uint8, path
    assert np.abs(load_image(grey).astype(int) - 77).max() <= 1
    assert np.abs(load_image(cmyk).astype(int) - [255, 0, 0]).max() <= 3
    assert (load_image(rgba) == [10, 200, 30]).all()
    assert (load_image(deep) == 255).all()
    transparent = tmp_path / "transparent.png"
    Image.new("RGBA", (8, 6), (200, 200, 200, 0)).save(transparent)
    assert (load_image(transparent) == 0).all()  # composed on black


def _exif_jpeg(path, orientation):
    """A 12x4 (W x H) JPEG, left half black, right half white, with an EXIF orientation tag."""
    pixels = np.zeros((4, 12, 3), np.uint8)
    pixels[:, 6:] = 255
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    Image.fromarray(pixels).save(path, quality=100, exif=exif.tobytes())


def test_exif_orientation_follows_the_annotated_size(tmp_path):
    path = tmp_path / "rotated.jpg"
    _exif_jpeg(path, 6)  # "rotate 90 degrees clockwise to view"
    upright = load_image(path)
    assert upright.shape == (12, 4, 3)
    assert upright[:5].mean() < 30 and upright[7:].mean() > 225  # black on top after turning clockwise
    # COCO's case: the annotations describe the stored 12x4 bitmap, so the tag is not applied.
    stored = load_image(path, expected_size=(12, 4))
    assert stored.shape == (4, 12, 3) and stored[:, :5].mean() < 30
    assert load_image(path, expected_size=(4, 12)).shape == (12, 4, 3)
    with pytest.raises(UserError, match=r"rotated.jpg: the image is 12x4 pixels \(4x12 after its EXIF "
                                        r"orientation\) but its annotation says width=10, height=4"):
        load_image(path, expected_size=(10, 4))
    flipped = tmp_path / "upside_down.jpg"
    _exif_jpeg(flipped, 3)  # 180 degrees keeps the size: the tag is applied
    assert load_image(flipped, expected_size=(12, 4))[:, :5].mean() > 225


def test_unreadable_images_name_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match="bad.jpg: cannot read the image"):
        load_image(bad)
    with pytest.raises(UserError, match="absent.jpg: image file not found"):
        load_image(tmp_path / "absent.jpg")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20000, 12000))
    with pytest.raises(UserError, match="bomb.png: Image size .* exceeds limit .*on_bad_annotation: drop"):
        load_image(bomb)
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 48), (1, 2, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(UserError, match="truncated.png: cannot read the image"):
        load_image(truncated)


def test_validation_reads_exif_sizes(tmp_path):
    folder, data = _tiny(tmp_path)
    _exif_jpeg(folder / "a.jpg", 6)
    data["images"][0].update(width=4, height=12)  # annotated upright
    data["annotations"] = data["annotations"][2:]
    assert len(_read(_write(tmp_path, data), folder)["images"]) == 2


# ------------------------------------------------------------------ categories


def test_category_map_round_trips_non_contiguous_ids():
    categories = CategoryMap.from_coco([{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"},
                                        {"id": 13, "name": "stop sign"}])
    assert categories.ids == (1, 13, 90) and categories.num_classes == 3
    assert categories.labels(np.array([90, 1, 13])).tolist() == [3, 1, 2]
    assert categories.category_ids(np.array([3, 1, 2])).tolist() == [90, 1, 13]
    assert categories.category_id(2) == 13 and categories.name(13) == "stop sign"
    with pytest.raises(KeyError, match="category id 12"):
        categories.label(12)
    with pytest.raises(KeyError, match="0 is background"):
        categories.category_ids(np.array([0]))
