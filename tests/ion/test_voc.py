"""Pascal VOC: the devkit reader on a VOC-format fixture of coco-mini photos, and
VOC AP against a plain-loop transcription of the devkit's voc_eval written here."""
import json
import math
import random
import shutil

import numpy as np
import pytest

from ion.data.voc import VOC_CLASSES, load_voc_split, read_voc_image_set, voc_box_to_xyxy
from ion.errors import UserError
from ion.evaluation.coco_eval import coco_eval
from ion.evaluation.voc_ap import voc_eval
from tests.helpers import OBJECTS_2007, OBJECTS_2012, PHOTOS, coco_mini, write_voc_root

# ------------------------------------------------------------------ fixture: a VOC devkit of coco-mini photos


@pytest.fixture
def devkit(tmp_path):
    mini = coco_mini() / "val2017"
    voc07, voc12 = tmp_path / "VOCdevkit" / "VOC2007", tmp_path / "VOCdevkit" / "VOC2012"
    write_voc_root(voc07, {name: (mini / p, w, h, objs) for name, (p, w, h), objs
                        in zip(OBJECTS_2007, PHOTOS, OBJECTS_2007.values())})
    write_voc_root(voc12, {"2008_000123": (mini / PHOTOS[2][0], 333, 500, OBJECTS_2012["2008_000123"])})
    return voc07, voc12


def test_reader_boxes_difficult_categories(devkit):
    voc07, _ = devkit
    coco = read_voc_image_set(voc07, "trainval")
    assert [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])] == list(VOC_CLASSES)
    assert [c["id"] for c in coco["categories"]] == list(range(1, 21))
    assert [(img["id"], img["file_name"], img["width"], img["height"]) for img in coco["images"]] == [
        (2007000005, "000005.jpg", 640, 427), (2007000007, "000007.jpg", 640, 426),
        (2007000009, "000009.jpg", 333, 500)]
    anns = coco["annotations"]
    expected = [(2007000000 + int(name), cls, box, diff or 0) for name, objs in OBJECTS_2007.items()
                for cls, box, diff in objs]
    assert len(anns) == len(expected) == 6
    for ann, (image_id, cls, (xmin, ymin, xmax, ymax), diff) in zip(anns, expected):
        assert ann["image_id"] == image_id and ann["category_id"] == VOC_CLASSES.index(cls) + 1
        # 1-based inclusive xmin..xmax -> continuous [xmin - 1, xmax]: width xmax - xmin + 1
        assert ann["bbox"] == [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
        assert voc_box_to_xyxy(xmin, ymin, xmax, ymax) == [xmin - 1, ymin - 1, xmax, ymax]
        assert ann["area"] == (xmax - xmin + 1) * (ymax - ymin + 1)
        assert ann["difficult"] == ann["iscrowd"] == diff  # an absent <difficult> is 0
    assert anns[5]["bbox"] == [6, 6, 1, 1]  # the one-pixel box
    assert anns[0]["segmentation"] == [[262, 210, 324, 210, 324, 339, 262, 339]]
    assert len({a["id"] for a in anns}) == 6


def test_split_07_plus_12_and_evaluators_ignore_difficult(devkit):
    voc07, voc12 = devkit
    split = load_voc_split([(voc07, "trainval"), (str(voc12), "trainval")])
    coco = split.coco
    assert split.image_dir == voc07.parent.resolve()
    assert [img["file_name"] for img in coco["images"]] == [
        "VOC2007/JPEGImages/000005.jpg", "VOC2007/JPEGImages/000007.jpg", "VOC2007/JPEGImages/000009.jpg",
        "VOC2012/JPEGImages/2008_000123.jpg"]
    assert all((split.image_dir / img["file_name"]).is_file() for img in coco["images"])
    assert coco["images"][3]["id"] == 2008000123 and coco["images"][3]["voc_name"] == "2008_000123"
    assert [a["id"] for a in coco["annotations"]] == list(range(1, 9))
    json.dumps(coco)  # writable as the split's annotation file
    # The ground truth's regular boxes as detections: AP 1 both ways, the difficult ones are not misses.
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in coco["annotations"] if not a["difficult"]]
    voc = voc_eval(coco, dets)
    # The devkit's running sum of eleven 1/11 is 1.0000000000000002.
    assert voc.mean_ap_11_point == pytest.approx(1.0, abs=1e-12) and voc.mean_ap_all_point == 1.0
    assert set(voc.ap_all_point) == {VOC_CLASSES.index(c) + 1 for c in ("chair", "diningtable", "car",
                                                                          "tvmonitor", "aeroplane")}
    assert coco_eval(coco, dets).stats["AP50"] == pytest.approx(1.0)


def test_split_rejects_an_image_in_two_sets(devkit):
    voc07, _ = devkit
    (voc07 / "ImageSets" / "Main" / "val.txt").write_text("000007\n")
    with pytest.raises(UserError, match=r"val\.txt: image '000007' .*also in .*trainval"):
        load_voc_split([(voc07, "trainval"), (voc07, "val")])


def _edit_xml(voc07, name, old, new):
    path = voc07 / "Annotations" / f"{name}.xml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize("breakage, message", [
    (lambda r: _edit_xml(r, "000007", "</annotation>", ""), r"000007\.xml: malformed XML at line 1, column"),
    (lambda r: _edit_xml(r, "000005", "<name>chair</name>", "<name>Chair</name>"),
     r"000005\.xml: object 0 <name> is 'Chair', not a VOC class \(use one of aeroplane, "),
    (lambda r: _edit_xml(r, "000007", "<xmax>500</xmax>", "<xmax>641</xmax>"),
     r"000007\.xml: object 0 \(car\) <bndbox> xmin=141 ymin=50 xmax=641 ymax=330 is empty or outside the "
     r"640x426 image"),
    (lambda r: _edit_xml(r, "000007", "<xmin>141</xmin>", "<xmin>0</xmin>"), r"000007\.xml: .*outside"),
    (lambda r: _edit_xml(r, "000007", "<ymin>50</ymin>", "<ymin>5O</ymin>"),
     r"000007\.xml: object 0 \(car\) bndbox <ymin> is '5O', not a number"),
    (lambda r: _edit_xml(r, "000007", "<ymin>50</ymin>", ""),
     r"000007\.xml: object 0 \(car\) bndbox <bndbox> has no <ymin>"),
    (lambda r: _edit_xml(r, "000005", "<difficult>1</difficult>", "<difficult>yes</difficult>"),
     r"000005\.xml: object 2 <difficult> is 'yes' \(use 0 or 1\)"),
    (lambda r: (r / "Annotations" / "000009.xml").unlink(), r"000009\.xml: annotation file not found"),
    (lambda r: (r / "JPEGImages" / "000009.jpg").unlink(), r"000009\.jpg: image file not found"),
    (lambda r: (r / "ImageSets" / "Main" / "trainval.txt").rename(r / "ImageSets" / "Main" / "train.txt"),
     r"trainval\.txt: image-set file not found \(choose one of \['train'\]"),
    (lambda r: shutil.rmtree(r / "Annotations"), r"Annotations: Annotations folder not found"),
    (lambda r: _edit_xml(r, "000007", "<width>640</width>", "<width>600</width>"),
     r"000007\.xml: <size> says 600x426 but .*000007\.jpg is 640x426"),
])
def test_reader_errors_name_file_field_fix(devkit, breakage, message):
    voc07, _ = devkit
    breakage(voc07)
    with pytest.raises(UserError, match=message) as err:
        read_voc_image_set(voc07, "trainval")
    assert "\n" not in str(err.value)


def test_reader_missing_root(tmp_path):
    with pytest.raises(UserError, match=r"VOC2007: VOC root folder not found \(point the VOC root"):
        load_voc_split([(tmp_path / "VOC2007", "trainval")])


# ------------------------------------------------------------------ VOC AP: a plain transcription of voc_eval


def _inclusive(bbox):
    """COCO [x, y, w, h] continuous -> the devkit's 1-based inclusive [xmin, ymin, xmax, ymax]."""
    x, y, w, h = bbox
    return [x + 1.0, y + 1.0, x + w, y + h]


def devkit_voc_eval(gt: dict, dets: list, category_id: int, use_07_metric: bool):
    """voc_eval for one class, loop by loop: (AP, npos); AP None when npos is 0."""
    class_recs, npos = {}, 0
    for img in gt["images"]:
        objs = [a for a in gt["annotations"] if a["image_id"] == img["id"] and a["category_id"] == category_id]
        difficult = [bool(a["difficult"]) for a in objs]
        class_recs[img["id"]] = {"bbox": [_inclusive(a["bbox"]) for a in objs], "difficult": difficult,
                                 "det": [False] * len(objs)}
        npos += sum(1 for d in difficult if not d)
    if npos == 0:
        return None, 0
    mine = sorted((d for d in dets if d["category_id"] == category_id), key=lambda d: -d["score"])  # stable
    tp, fp = [], []
    for d in mine:
        R = class_recs[d["image_id"]]
        bb = _inclusive(d["bbox"])
        ovmax, jmax = -math.inf, -1
        for j, g in enumerate(R["bbox"]):
            iw = max(min(g[2], bb[2]) - max(g[0], bb[0]) + 1., 0.)
            ih = max(min(g[3], bb[3]) - max(g[1], bb[1]) + 1., 0.)
            inters = iw * ih
            uni = (bb[2] - bb[0] + 1.) * (bb[3] - bb[1] + 1.) + (g[2] - g[0] + 1.) * (g[3] - g[1] + 1.) - inters
            if inters / uni > ovmax:  # strict: the first of equal overlaps, as np.argmax
                ovmax, jmax = inters / uni, j
        if ovmax > 0.5:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp.append(1.), fp.append(0.)
                    R["det"][jmax] = True
                else:
                    tp.append(0.), fp.append(1.)
            else:
                tp.append(0.), fp.append(0.)
        else:
            tp.append(0.), fp.append(1.)
    rec, prec, ctp, cfp = [], [], 0., 0.
    for t, f in zip(tp, fp):
        ctp, cfp = ctp + t, cfp + f
        rec.append(ctp / float(npos))
        prec.append(ctp / max(ctp + cfp, np.finfo(np.float64).eps))
    if use_07_metric:
        ap = 0.
        for t in [i * 0.1 for i in range(11)]:  # the values of np.arange(0., 1.1, 0.1)
            p = max((p for r, p in zip(rec, prec) if r >= t), default=0)
            ap = ap + p / 11.
        return ap, npos
    mrec, mpre = [0.] + rec + [1.], [0.] + prec + [0.]
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    return sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i]), npos


def _random_fixture(seed: int):
    """Ground truth and detections with every case the rules distinguish.

    Categories 1..5: 4 has only difficult ground truth, 5 none at all (both still get detections); images
    with no ground truth; identical ground-truth boxes (IoU ties); difficult boxes; several detections per
    object (duplicates); identical detections; scores on a coarse grid (ties); integer VOC-like corners and
    some half-pixel ones.
    """
    rng = random.Random(seed)
    images = [{"id": 100 + i, "width": 500, "height": 400, "file_name": f"{i}.jpg"} for i in range(40)]
    anns = []
    for img in images[:30]:  # the last 10 have no ground truth
        for _ in range(rng.randint(0, 6)):
            cat = rng.choice([1, 1, 2, 2, 3, 4])
            x, y = rng.randint(0, 400), rng.randint(0, 300)
            box = [x, y, rng.randint(1, 100), rng.randint(1, 100)]
            for _ in range(2 if rng.random() < 0.1 else 1):
                anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": cat, "bbox": list(box),
                             "difficult": int(cat == 4 or rng.random() < 0.15), "iscrowd": 0})
    dets = []
    for a in anns:
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            x, y, w, h = a["bbox"]
            jitter = [rng.choice([-3, -1, 0, 0, 1, 2, 0.5, -0.5]) for _ in range(4)]
            box = [x + jitter[0], y + jitter[1], max(1, w + jitter[2]), max(1, h + jitter[3])]
            cat = a["category_id"] if rng.random() < 0.9 else rng.randint(1, 5)
            dets.append({"image_id": a["image_id"], "category_id": cat, "bbox": box,
                         "score": round(rng.random(), 1)})
            if rng.random() < 0.1:
                dets.append(dict(dets[-1]))
    for _ in range(150):  # background detections, on any image and class
        x, y = rng.randint(0, 400), rng.randint(0, 300)
        dets.append({"image_id": rng.choice(images)["id"], "category_id": rng.randint(1, 5),
                     "bbox": [x, y, rng.randint(1, 100), rng.randint(1, 100)], "score": round(rng.random(), 1)})
    rng.shuffle(dets)
    assert any(a["difficult"] and a["category_id"] != 4 for a in anns)
    categories = [{"id": c, "name": f"c{c}"} for c in range(1, 6)]
    return {"images": images, "annotations": anns, "categories": categories}, dets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voc_ap_equals_devkit_transcription(seed):
    gt, dets = _random_fixture(seed)
    metrics = voc_eval(gt, dets)
    for use_07, ours, mean in ((True, metrics.ap_11_point, metrics.mean_ap_11_point),
                               (False, metrics.ap_all_point, metrics.mean_ap_all_point)):
        expected = {}
        for cat in range(1, 6):
            ap, npos = devkit_voc_eval(gt, dets, cat, use_07)
            assert metrics.num_positives[cat] == npos
            if ap is not None:
                expected[cat] = ap
        assert set(expected) == {1, 2, 3}  # 4 (only difficult) and 5 (none) have no AP
        assert ours == pytest.approx(expected, abs=1e-9, rel=0)
        assert mean == pytest.approx(sum(expected.values()) / 3, abs=1e-9, rel=0)
    assert 0.05 < metrics.mean_ap_all_point < 0.95  # neither trivial
    # The fixture holds what it claims: ties, duplicates, and detections matched onto difficult boxes.
    assert len({d["score"] for d in dets}) < len(dets) / 10


def _gt(boxes, difficult=None, image_ids=None):
    """One class (id 1) of ground truth [x, y, w, h] on 100x100 images; class 2 has none."""
    image_ids = image_ids or [1] * len(boxes)
    difficult = difficult or [0] * len(boxes)
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in sorted(set(image_ids) | {1})]
    anns = [{"id": k + 1, "image_id": i, "category_id": 1, "bbox": b, "difficult": d, "iscrowd": 0}
            for k, (b, i, d) in enumerate(zip(boxes, image_ids, difficult))]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def _dets(boxes, scores, image_ids=None):
    image_ids = image_ids or [1] * len(boxes)
    return [{"image_id": i, "category_id": 1, "bbox": b, "score": s} for b, s, i in zip(boxes, scores, image_ids)]


def test_voc_ap_known_values():
    boxes = [[0, 0, 10, 10], [20, 20, 10, 10]]
    perfect = voc_eval(_gt(boxes), _dets(boxes, [0.9, 0.8]))
    assert perfect.ap_11_point[1] == pytest.approx(1.0, abs=1e-12) and perfect.ap_all_point == {1: 1.0}
    assert perfect.mean_ap_all_point == 1.0 and perfect.num_positives == {1: 2, 2: 0}  # class 2: no AP, not in mean

    # One TP then one FP, npos = 2: recall (0.5, 0.5), precision (1, 0.5).
    # 11-point: recall reaches t = 0, 0.1, ..., 0.5 with best precision 1, never 0.6..1 -> 6/11.
    # All-point: envelope 1 up to recall 0.5, then 0 -> 0.5 * 1 + 0.5 * 0 = 0.5.
    one = voc_eval(_gt(boxes), _dets([[0, 0, 10, 10], [50, 50, 10, 10]], [0.9, 0.8]))
    assert one.ap_11_point[1] == pytest.approx(6 / 11, abs=1e-12) and one.ap_all_point[1] == 0.5

    # FP then TP, npos = 1: recall (0, 1), precision (0, 0.5): every t reached at precision 0.5 -> 0.5 both ways.
    late = voc_eval(_gt(boxes[:1]), _dets([[50, 50, 10, 10], [0, 0, 10, 10]], [0.9, 0.8]))
    assert late.ap_11_point[1] == pytest.approx(0.5, abs=1e-12) and late.ap_all_point[1] == 0.5

    nothing = voc_eval(_gt(boxes), [])
    assert nothing.ap_11_point == nothing.ap_all_point == {1: 0.0}
    assert voc_eval(_gt([]), []).mean_ap_all_point == -1.0  # no class with ground truth


def test_voc_ap_strict_threshold_and_plus_one_widths():
    gt = _gt([[0, 0, 10, 10]])  # inclusive 1..10: 100 pixels
    # Inclusive 1..10 x 1..5: 50 pixels inside the 100 -> IoU exactly 0.5, not > 0.5: a FP.
    assert voc_eval(gt, _dets([[0, 0, 10, 5]], [1.0])).ap_all_point[1] == 0.0
    # 1..10 x 1..6: 60 / 100 = 0.6 -> TP.
    assert voc_eval(gt, _dets([[0, 0, 10, 6]], [1.0])).ap_all_point[1] == 1.0


def test_voc_ap_difficult_duplicates_and_ties():
    gt = _gt([[0, 0, 10, 10], [40, 40, 10, 10]], difficult=[0, 1])
    # In score order: a hit on gt 0 (TP); a second hit on gt 0, IoU 90/110 (FP, duplicate); two hits on the
    # difficult gt 1 (neither, both times). npos = 1: recall (1, 1, 1, 1), precision (1, .5, .5, .5) -> AP 1.
    dets = _dets([[40, 40, 10, 10], [0, 0, 10, 10], [1, 0, 10, 10], [40, 41, 10, 10]], [0.5, 0.9, 0.8, 0.8])
    metrics = voc_eval(gt, dets)
    assert metrics.num_positives[1] == 1 and metrics.ap_11_point[1] == pytest.approx(1.0, abs=1e-12)
    assert metrics.ap_all_point[1] == 1.0

    # The highest-IoU ground truth is taken even when already matched: the second detection sits on gt 0
    # (IoU 1, matched) and overlaps gt 1 (IoU 70/100, free): a duplicate FP, not a match to gt 1.
    # TP, FP with npos 2: recall (0.5, 0.5) -> 6/11 and 0.5, as in test_voc_ap_known_values.
    m2 = voc_eval(_gt([[0, 0, 10, 10], [0, 0, 10, 7]]), _dets([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8]))
    assert m2.ap_11_point[1] == pytest.approx(6 / 11, abs=1e-12) and m2.ap_all_point[1] == 0.5

    # Tied scores keep their input order: FP then TP (npos 1) -> precision 0.5 at recall 1 -> 0.5;
    # TP then FP -> 1.
    miss, hit = [50, 50, 10, 10], [0, 0, 10, 10]
    assert voc_eval(_gt([hit]), _dets([miss, hit], [0.8, 0.8])).ap_all_point[1] == 0.5
    assert voc_eval(_gt([hit]), _dets([hit, miss], [0.8, 0.8])).ap_all_point[1] == 1.0


def test_voc_ap_11_point_thresholds_are_the_devkit_floats():
    # Three TPs of 10 objects: recall 3/10 == 0.29999999999999998 < 0.30000000000000004, the devkit's "0.3",
    # so only t = 0, 0.1, 0.2 count: AP 3/11, not 4/11.
    boxes = [[10 * k, 0, 5, 5] for k in range(10)]
    metrics = voc_eval(_gt(boxes), _dets(boxes[:3], [1.0, 1.0, 1.0]))
    assert metrics.ap_11_point[1] == pytest.approx(3 / 11, abs=1e-12)
    assert metrics.ap_all_point[1] == pytest.approx(0.3, abs=1e-12)


def test_voc_ap_unknown_image_is_user_error():
    with pytest.raises(UserError, match=r"1 image ids are not in the ground truth, e\.g\. \[7\]"):
        voc_eval(_gt([[0, 0, 10, 10]]), _dets([[0, 0, 10, 10]], [1.0], image_ids=[7]))
