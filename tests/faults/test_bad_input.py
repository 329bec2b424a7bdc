"""Bad annotations, images and a loss that goes non-finite: exit 2, one line, the fix."""
from __future__ import annotations

import json
import shutil

from tests.faults.conftest import assert_ok, assert_one_error_line, run, stage_results
from tests.helpers import png_header


def test_non_finite_loss_is_one_line_with_where_and_what_to_change(shared_run, tmp_path):
    workdir = shared_run.copy(tmp_path)
    proc = run(workdir, "--stages", "train", "-o", "model.input.pixel_std=[1.0e-45,1.0,1.0]")
    line = assert_one_error_line(proc, "non-finite", "iteration 0", "image ", "last good checkpoint",
                                 "model.input.pixel_mean/pixel_std")
    assert "Ray" not in proc.stderr.replace(line, "")  # not retried


def coco_overrides(annotations: str, images: str, **extra: str) -> list[str]:
    """-o flags for data.source coco on the smoke data stage's own files: `annotations`
    as train, its minival as val (4 held out as minival, the rest the test split)."""
    # data.source last: each -o is checked as it is applied, and source coco needs the files named.
    flags = {"data.coco.train_annotations": annotations, "data.coco.train_images": images,
             "data.coco.val_annotations": annotations.replace("train", "minival"),
             "data.coco.val_images": images, "data.coco.minival_size": "4", "data.coco.val_rest": "test", **extra,
             "data.source": "coco"}
    return [word for key, value in flags.items() for word in ("-o", f"{key}={value}")]


def _coco_copy(shared_run, tmp_path):
    data = shared_run.artifact("data")
    shutil.copytree(data / "annotations", tmp_path / "annotations")
    shutil.copytree(data / "images", tmp_path / "images")
    path = tmp_path / "annotations" / "train.json"
    return path, json.loads(path.read_text()), tmp_path / "images"


def test_rle_size_given_as_an_int_names_the_annotation(shared_run, tmp_path, workdir):
    path, coco, images = _coco_copy(shared_run, tmp_path)
    ann = coco["annotations"][0]
    img = next(i for i in coco["images"] if i["id"] == ann["image_id"])
    ann["segmentation"] = {"size": img["height"], "counts": [img["height"] * img["width"]]}
    path.write_text(json.dumps(coco))

    proc = run(workdir, "--stages", "data", *coco_overrides(str(path), str(images)))
    assert_one_error_line(proc, f"{path}: annotations[0] (id={ann['id']}): RLE size must be a list of 2 integers",
                          "on_bad_annotation: drop")

    dropped = run(workdir, "--stages", "data",
                  *coco_overrides(str(path), str(images), **{"data.coco.on_bad_annotation": "drop"}))
    assert_ok(dropped)
    assert stage_results(dropped.stdout) == {"data": "ran"}


def test_decompression_bomb_image_names_the_file(shared_run, tmp_path, workdir):
    path, coco, images = _coco_copy(shared_run, tmp_path)
    (images / "train" / "bomb.png").write_bytes(png_header(20000, 12000))  # 33 bytes declaring 240 Mpixels
    coco["images"].append({"id": 999999, "file_name": "train/bomb.png", "width": 20000, "height": 12000})
    path.write_text(json.dumps(coco))

    proc = run(workdir, "--stages", "data", *coco_overrides(str(path), str(images)))
    assert_one_error_line(proc, f"{images / 'train' / 'bomb.png'}: Image size (240000000 pixels) exceeds limit")

    dropped = run(workdir, "--stages", "data",
                  *coco_overrides(str(path), str(images), **{"data.coco.on_bad_annotation": "drop"}))
    assert_ok(dropped)
