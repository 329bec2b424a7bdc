"""bench/coco_scale.py at scale 0.002: the COCO 2014 layout, counts, schema and MCG files
as the pipeline's readers take them."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import scipy.io
from pycocotools.coco import COCO

from bench import coco_scale
from proposals.mcg import load_mcg_proposals, locate_mcg_files

SCALE = 0.002
ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"train2014": "instances_train2014.json", "val2014": "instances_val2014.json",
           "test2015": "image_info_test-dev2015.json"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("coco_scale")
    # As a user runs it: the module's command line, in its own process (the pool forks from it).
    subprocess.run([sys.executable, "-m", "bench.coco_scale", "--out", str(out), "--scale", str(SCALE),
                    "--seed", "3", "--workers", "2"], cwd=ROOT, check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def cocos(tree) -> dict:
    return {folder: COCO(str(tree / "annotations" / name)) for folder, name in FOLDERS.items()}


def test_layout_and_counts(tree, cocos):
    expected = {"train2014": round(82_783 * SCALE), "val2014": round(40_504 * SCALE),
                "test2015": round(20_288 * SCALE)}
    for folder, count in expected.items():
        names = sorted(p.name for p in (tree / folder).iterdir())
        assert len(names) == count
        assert names == sorted(img["file_name"] for img in cocos[folder].dataset["images"])
        assert all(n == f"COCO_{folder}_{int(n[-16:-4]):012d}.jpg" for n in names)
        assert len(list((tree / "mcg" / folder).glob("*.mat"))) == count
    annotated = sum(len(cocos[f].dataset["annotations"]) for f in ("train2014", "val2014"))
    images = expected["train2014"] + expected["val2014"]
    assert 5.5 < annotated / images < 9.5  # COCO: 7.3 boxes per image
    minival = (tree / "annotations" / "minival_ids.txt").read_text().split()
    val_ids = sorted(img["id"] for img in cocos["val2014"].dataset["images"])
    assert [int(i) for i in minival] == val_ids[:round(5000 * SCALE)]


def test_ids_sparse_and_disjoint(cocos):
    ids = [img["id"] for c in cocos.values() for img in c.dataset["images"]]
    assert len(set(ids)) == len(ids)
    assert max(ids) > 10 * len(ids)  # sparse like COCO's (up to 581,929)
    ann_ids = [a["id"] for f in ("train2014", "val2014") for a in cocos[f].dataset["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)


def test_schema_and_categories(tree, cocos):
    for folder, coco in cocos.items():
        data = coco.dataset
        assert {"info", "licenses", "images", "categories"} <= set(data)
        assert ("annotations" in data) == (folder != "test2015")
        cats = data["categories"]
        assert len(cats) == 80 and {c["id"] for c in cats} == {c[0] for c in coco_scale.CATEGORIES}
        assert max(c["id"] for c in cats) == 90 and 12 not in {c["id"] for c in cats}
        assert next(c for c in cats if c["id"] == 90) == {"supercategory": "indoor", "id": 90, "name": "toothbrush"}
    from PIL import Image
    for img in cocos["train2014"].dataset["images"][:20]:
        with Image.open(tree / "train2014" / img["file_name"]) as im:
            assert im.size == (img["width"], img["height"])  # the pipeline rejects any other size
            assert 64 <= max(im.size) <= 96


def test_segmentations_decode(cocos):
    crowd = 0
    for folder in ("train2014", "val2014"):
        coco = cocos[folder]
        for ann in coco.dataset["annotations"]:
            img = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= img["width"] + 1e-6 and y + h <= img["height"] + 1e-6
            mask = coco.annToMask(ann)
            assert mask.shape == (img["height"], img["width"]) and mask.any()
            if ann["iscrowd"]:
                crowd += 1
                seg = ann["segmentation"]
                assert isinstance(seg["counts"], list) and seg["size"] == [img["height"], img["width"]]
                rle = mask_utils.frPyObjects(seg, *seg["size"])
                assert mask_utils.area(rle) == ann["area"]
                assert list(mask_utils.toBbox(rle)) == pytest.approx(ann["bbox"])
            else:
                assert isinstance(ann["segmentation"], list) and len(ann["segmentation"][0]) >= 6
    assert crowd >= 1  # ~1% of ~1800 annotations


def test_mcg_files_read_back(tree, cocos):
    for folder, coco in cocos.items():
        images = [(img["id"], img["file_name"]) for img in coco.dataset["images"]]
        files = locate_mcg_files(tree / "mcg", images)
        assert not files.missing
        img = coco.dataset["images"][0]
        path = files.paths[img["id"]]
        assert path.name == Path(img["file_name"]).stem + ".mat"
        raw = scipy.io.loadmat(path)
        yxyx, scores = raw["boxes"].astype(np.float64), raw["scores"].reshape(-1)
        assert yxyx.shape == (2000, 4) and scores.shape == (2000,)
        assert yxyx.min() >= 1 and np.all(np.diff(scores) < 0)
        boxes, read_scores = load_mcg_proposals(path, width=img["width"], height=img["height"], top_n=2000)
        # 1-based inclusive [y1 x1 y2 x2] -> continuous [x1 - 1, y1 - 1, x2, y2], order and count kept.
        expected = np.stack([yxyx[:, 1] - 1, yxyx[:, 0] - 1, yxyx[:, 3], yxyx[:, 2]], axis=1)
        np.testing.assert_array_equal(boxes, expected.astype(np.float32))
        np.testing.assert_array_equal(read_scores, scores.astype(np.float32))
        assert boxes[:, 2].max() <= img["width"] and boxes[:, 3].max() <= img["height"]


def test_deterministic_for_a_seed(tree, tmp_path):
    again = tmp_path / "again"
    coco_scale.generate(again, scale=SCALE, seed=3, workers=1, mcg=10)
    first = json.loads((tree / "annotations" / "instances_val2014.json").read_text())
    second = json.loads((again / "annotations" / "instances_val2014.json").read_text())
    assert first == second
    assert (tree / "val2014" / first["images"][0]["file_name"]).read_bytes() == \
        (again / "val2014" / first["images"][0]["file_name"]).read_bytes()
