"""COCO evaluation: pycocotools reproduces the published cocoapi-fake stats,
the fast Evaluator equals pycocotools to 1e-9 (cocoapi-fake and randomized
project detections), and the results files are what the COCO tools expect."""
import contextlib
import copy
import io
import json
import pickle
import zipfile

import numpy as np
import pytest
from pycocotools.coco import COCO

from ion.data.categories import CategoryMap
from ion.errors import UserError
from ion.evaluation.coco_eval import coco_eval
from ion.evaluation.evaluator import Evaluator, flatten_detections
from ion.evaluation.metrics import STAT_NAMES
from ion.evaluation.results import (
    submission_name,
    to_coco_results,
    validate_results,
    write_results,
    write_submission_zip,
)
from ion.inference.postprocess import Detections

# The 12 summary stats pycocotools 2.0.11 gives (iouType "bbox") for the COCO API's fake results on this ground truth
README_STATS = (0.5045806987, 0.6969727247, 0.5729816670, 0.5856257209, 0.5193996948, 0.5013978986,
                0.3868127796, 0.5936795763, 0.5953529829, 0.6398109626, 0.5664205979, 0.5642905983)
EXTRA_IMAGE = 999_999_999


@pytest.fixture(scope="module")
def fake(shared_dir):
    d = shared_dir / "data" / "cocoapi-fake"
    with open(d / "instances_val2014_100.json") as f:
        gt = json.load(f)
    with open(d / "instances_val2014_fakebbox100_results.json") as f:
        results = json.load(f)
    return gt, results


@pytest.fixture(scope="module")
def mini_gt(shared_dir):
    """coco-mini val, plus the quirks pycocotools handles in its own way: an
    image without annotations, an annotation with id 0 (pycocotools stores the
    matched id as the match flag), and an exact duplicate annotation (IoU ties)."""
    with open(shared_dir / "data" / "coco-mini" / "annotations" / "instances_val2017.json") as f:
        gt = json.load(f)
    gt = copy.deepcopy(gt)
    gt["images"].append({"id": EXTRA_IMAGE, "width": 640, "height": 480, "file_name": "none.jpg"})
    gt["annotations"][3]["id"] = 0
    duplicate = dict(gt["annotations"][10], id=987_654_321)
    gt["annotations"].append(duplicate)
    return gt


def random_results(gt: dict, seed: int) -> list[dict]:
    """Detections as a detector would make them, and worse: jittered copies of
    ground-truth boxes (some exact, some of the wrong class), random false
    positives, scores rounded to 2 decimals (many ties), more than 100
    detections for one (image, category), detections on an image without
    objects and of an unknown category, all in shuffled order."""
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in gt["categories"]]
    res = []

    def add(image_id, category_id, box, score):
        res.append({"image_id": image_id, "category_id": int(category_id), "bbox": [float(v) for v in box],
                    "score": float(np.round(score, 2))})

    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        for _ in range(rng.integers(0, 6)):
            s = rng.uniform(0, 0.25)
            box = [x + rng.normal(0, s * w), y + rng.normal(0, s * h), w * np.exp(rng.normal(0, s)),
                   h * np.exp(rng.normal(0, s))]
            exact = rng.random() < 0.1
            add(a["image_id"], a["category_id"] if rng.random() < 0.85 else rng.choice(cats),
                [x, y, w, h] if exact else box, rng.random())
    for im in gt["images"]:
        for _ in range(rng.integers(0, 40)):
            w, h = im["width"] * rng.uniform(0.01, 0.6), im["height"] * rng.uniform(0.01, 0.6)
            add(im["id"], rng.choice(cats),
                [rng.uniform(0, im["width"] - w), rng.uniform(0, im["height"] - h), w, h], rng.random())
    a = gt["annotations"][20]
    x, y, w, h = a["bbox"]
    for _ in range(250):
        add(a["image_id"], a["category_id"], [x + rng.normal(0, 0.1 * w), y + rng.normal(0, 0.1 * h), w, h],
            rng.random())
    for _ in range(20):
        add(EXTRA_IMAGE, cats[0], [10, 10, 50, 50], 0.5)
    add(a["image_id"], 100_000, [x, y, w, h], 0.99)
    return [res[i] for i in rng.permutation(len(res))]


def assert_same_metrics(got, want):
    for name in STAT_NAMES:
        assert abs(got.stats[name] - want.stats[name]) <= 1e-9, (name, got.stats[name], want.stats[name])
    np.testing.assert_allclose(got.precision, want.precision, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.recall, want.recall, rtol=0, atol=1e-12)
    assert got.per_category_ap.keys() == want.per_category_ap.keys()


def test_pycocotools_reproduces_the_published_stats(fake):
    gt, results = fake
    metrics = coco_eval(gt, results)
    assert list(metrics.stats) == list(STAT_NAMES)
    np.testing.assert_allclose(list(metrics.stats.values()), README_STATS, rtol=0, atol=1e-9)
    assert metrics.per_size_ap == {"small": metrics.stats["APs"], "medium": metrics.stats["APm"],
                                   "large": metrics.stats["APl"]}


def test_coco_eval_is_quiet_and_leaves_the_results_alone(fake, capsys):
    gt, results = fake
    before = copy.deepcopy(results[:5])
    coco_eval(gt, results[:50])
    assert capsys.readouterr().out == ""
    assert results[:5] == before  # loadRes would have added id, area, segmentation


def test_fast_evaluator_equals_pycocotools_on_cocoapi_fake(fake):
    gt, results = fake
    got = Evaluator(gt).evaluate_results(results)
    assert_same_metrics(got, coco_eval(gt, results))
    np.testing.assert_allclose(list(got.stats.values()), README_STATS, rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed", range(2))
def test_fast_evaluator_equals_pycocotools_on_random_detections(mini_gt, seed):
    results = random_results(mini_gt, seed)
    want = coco_eval(mini_gt, results)
    assert 0.05 < want.stats["AP"] < 0.95
    assert_same_metrics(Evaluator(mini_gt).evaluate_results(results), want)


def test_fast_evaluator_on_per_image_detections(mini_gt):
    """Detections with labels 1..K and xyxy boxes, as postprocess returns them."""
    categories = CategoryMap.from_coco(mini_gt["categories"])
    rng = np.random.default_rng(7)
    per_image = {}
    for im in mini_gt["images"][:40]:
        anns = [a for a in mini_gt["annotations"] if a["image_id"] == im["id"]]
        xywh = np.array([a["bbox"] for a in anns] + [[5, 5, 60, 40]] * 5, dtype=np.float64)
        xywh += rng.normal(0, 3, xywh.shape)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
        cat_ids = np.array([a["category_id"] for a in anns] + [categories.ids[0]] * 5)
        per_image[im["id"]] = Detections(boxes, rng.random(len(boxes)).astype(np.float32),
                                         categories.labels(cat_ids))
    image_ids, boxes, scores, cat_ids = flatten_detections(per_image, categories)
    exact = [{"image_id": i, "category_id": c, "bbox": b, "score": s}
             for i, c, b, s in zip(image_ids.tolist(), cat_ids.tolist(), boxes.tolist(), scores.tolist())]
    evaluator = Evaluator(mini_gt, categories=categories)
    assert_same_metrics(evaluator.evaluate(per_image), coco_eval(mini_gt, exact))
    rounded = to_coco_results(per_image, categories)
    assert_same_metrics(evaluator.evaluate_results(rounded), coco_eval(mini_gt, rounded))


def test_no_detections(mini_gt):
    got = Evaluator(mini_gt).evaluate({})
    assert_same_metrics(got, coco_eval(mini_gt, []))
    assert got.stats["AP"] == 0.0 and got.stats["AR100"] == 0.0


def test_per_category_ap_averages_to_ap(fake):
    gt, results = fake
    metrics = Evaluator(gt).evaluate_results(results)
    assert len(metrics.per_category_ap) == len({a["category_id"] for a in gt["annotations"]})
    assert np.mean(list(metrics.per_category_ap.values())) == pytest.approx(metrics.stats["AP"], abs=1e-12)
    assert set(metrics.flat()) == set(STAT_NAMES) | {f"AP/category/{c}" for c in metrics.per_category_ap}
    curve = metrics.pr_curve(iou=0.5)
    assert curve.shape == (101,) and np.all(np.diff(curve) <= 0) and curve[0] > curve[-1]


def test_evaluator_pickles_for_workers(fake):
    gt, results = fake
    evaluator = Evaluator(gt)
    clone = pickle.loads(pickle.dumps(evaluator))
    assert clone.evaluate_results(results).stats == evaluator.evaluate_results(results).stats


def test_unknown_image_ids_are_user_errors(fake):
    gt, results = fake
    bad = results[:3] + [dict(results[0], image_id=-5)]
    with pytest.raises(UserError, match=r"\[-5\]"):
        Evaluator(gt).evaluate_results(bad)
    with pytest.raises(UserError, match=r"\[-5\]"):
        coco_eval(gt, bad)


def test_results_json_is_accepted_by_pycocotools(mini_gt, tmp_path):
    categories = CategoryMap.from_coco(mini_gt["categories"])
    image = mini_gt["images"][0]["id"]
    dets = {image: Detections(np.array([[10.123456, 20.5, 110.25, 80.0], [0, 0, 5, 5]], np.float32),
                              np.array([0.912345678, 0.5], np.float32), np.array([1, 3]))}
    results = to_coco_results(dets, categories)
    assert results[0] == {"image_id": image, "category_id": categories.ids[0],
                          "bbox": [10.12, 20.5, 100.13, 59.5], "score": 0.912346}
    assert results[1]["category_id"] == categories.ids[2]
    path = tmp_path / "results.json"
    write_results(path, results)
    assert not list(tmp_path.glob("*.tmp"))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = mini_gt
        coco_gt.createIndex()
        loaded = coco_gt.loadRes(str(path))
    assert len(loaded.anns) == 2
    assert loaded.anns[1]["bbox"] == results[0]["bbox"] and loaded.anns[1]["area"] == pytest.approx(100.13 * 59.5)
    validate_results(results, mini_gt)


def test_validate_results_names_unknown_ids(mini_gt):
    good = {"image_id": mini_gt["images"][0]["id"], "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}
    bad = [good] + [dict(good, image_id=-i) for i in range(1, 13)] + [dict(good, category_id=1000)]
    with pytest.raises(UserError) as err:
        validate_results(bad, mini_gt, source="out/results.json")
    message = str(err.value)
    assert message.startswith(
        "out/results.json: 12 unknown image ids [-12, -11, -10, -9, -8, -7, -6, -5, -4, -3] ...")
    assert "1 unknown category ids [1000]" in message
    with pytest.raises(UserError, match=r"detection \[1\] lacks \['score'\]"):
        validate_results([good, {k: v for k, v in good.items() if k != "score"}], mini_gt)


def test_submission_zip_layout(tmp_path):
    results = [{"image_id": 1, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}]
    path = write_submission_zip(tmp_path, results, algorithm="ion-vgg16")
    assert path == tmp_path / "detections_test-dev2015_ion-vgg16_results.zip"
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist() == ["detections_test-dev2015_ion-vgg16_results.json"]
        assert json.loads(zf.read(zf.namelist()[0])) == results
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    with pytest.raises(UserError, match="evaluate.algorithm"):
        submission_name(algorithm="ion_v2")
