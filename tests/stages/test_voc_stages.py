"""Pascal VOC as a data source: the data stage on a VOC-format fixture of
coco-mini photos (07 trainval + 12 trainval, 07 test), and the evaluate stage's
VOC07 metric beside COCO's on that split."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import stages.data as data_stage
import stages.evaluate as evaluate_stage
from ion.data.config import DataConfig, VocConfig, VocSetConfig
from ion.data.split import DetectionSplit
from ion.errors import UserError
from ion.evaluation.voc_ap import voc_eval
from pipeline.config import Config, load_config
from stages.helpers.raw_detections import ROUND1, write_raw
from tests.helpers import OBJECTS_2007, OBJECTS_2012, PHOTOS, FakeContext, coco_mini, write_voc_root

# Two more coco-mini photos as VOC 2007 test images, with their boxes.
TEST_PHOTOS = ("000000000139.jpg", "000000000802.jpg")
TEST_OBJECTS = ([("person", (10, 20, 200, 300), 0), ("tvmonitor", (300, 40, 420, 160), 0),
                 ("chair", (150, 200, 260, 330), 1)],
                [("diningtable", (20, 30, 300, 400), 0)])


@pytest.fixture
def devkit(tmp_path) -> tuple[Path, Path]:
    mini = coco_mini() / "val2017"
    voc07, voc12 = tmp_path / "VOCdevkit" / "VOC2007", tmp_path / "VOCdevkit" / "VOC2012"
    write_voc_root(voc07, {name: (mini / p, w, h, objs) for name, (p, w, h), objs
                        in zip(OBJECTS_2007, PHOTOS, OBJECTS_2007.values())})
    test = {}
    for k, (photo, objects) in enumerate(zip(TEST_PHOTOS, TEST_OBJECTS)):
        width, height = Image.open(mini / photo).size
        test[f"00010{k}"] = (mini / photo, width, height, objects)
    write_voc_root(voc07, test, image_set="test")
    write_voc_root(voc12, {"2008_000123": (mini / PHOTOS[2][0], 333, 500, OBJECTS_2012["2008_000123"])})
    return voc07, voc12


def _voc_config(voc07: Path, voc12: Path, **voc) -> Config:
    sets = dict(train=(VocSetConfig(str(voc07), "trainval"), VocSetConfig(str(voc12), "trainval")),
                test=(VocSetConfig(str(voc07), "test"),), minival_size=1)
    return dataclasses.replace(Config(), data=DataConfig(source="voc", voc=VocConfig(**{**sets, **voc})))


def _run_data(cfg: Config, out: Path):
    out.mkdir(parents=True)
    return data_stage.run(cfg, {}, out, FakeContext(out.parent))


def test_data_stage_writes_voc_as_coco_format_splits(devkit, tmp_path):
    voc07, voc12 = devkit
    out = tmp_path / "data"
    result = _run_data(_voc_config(voc07, voc12), out)
    index = json.loads((out / "index.json").read_text())
    assert index["source"] == "voc" and len(index["categories"]) == 20
    splits = {name: DetectionSplit.load(out, name) for name in ("train", "minival", "test")}
    # 07 trainval (3) + 12 trainval (1), the smallest id held out as minival.
    assert [r.image_id for r in splits["minival"].images] == [2007000005]
    assert sorted(r.image_id for r in splits["train"].images) == [2007000007, 2007000009, 2008000123]
    assert [r.image_id for r in splits["test"].images] == [2007000100, 2007000101]
    assert all(s.source == "voc" and s.has_annotations for s in splits.values())
    test = splits["test"]
    assert all(r.path.is_file() for r in test.images)
    # Boxes are continuous [xmin - 1, ymin - 1, xmax, ymax]; difficult boxes are iscrowd.
    np.testing.assert_array_equal(test.images[0].boxes, [[9, 19, 200, 300], [299, 39, 420, 160],
                                                         [149, 199, 260, 330]])
    assert test.images[0].iscrowd.tolist() == [False, False, True]
    anns = json.loads(test.annotation_file.read_text())["annotations"]
    assert [a["difficult"] for a in anns] == [0, 0, 1, 0]
    assert result.metrics["test_images"] == 2.0 and (out / "plots" / "preview.png").stat().st_size > 0


def test_voc_minival_sets_and_errors(devkit, tmp_path):
    voc07, voc12 = devkit
    out = tmp_path / "given"
    _run_data(_voc_config(voc07, voc12, train=(VocSetConfig(str(voc07), "trainval"),),
                          minival=(VocSetConfig(str(voc12), "trainval"),)), out)
    assert [r.image_id for r in DetectionSplit.load(out, "minival").images] == [2008000123]
    assert len(DetectionSplit.load(out, "train").images) == 3
    with pytest.raises(UserError, match=r"data\.voc\.minival_size: 4 is not fewer than the 4 training images"):
        _run_data(_voc_config(voc07, voc12, minival_size=4), tmp_path / "too_many")
    with pytest.raises(UserError, match="in both the train and the test sets"):
        _run_data(_voc_config(voc07, voc12, test=(VocSetConfig(str(voc12), "trainval"),)), tmp_path / "overlap")


def test_voc_config_needs_train_and_test_sets():
    with pytest.raises(ValueError, match=r"voc\.test: give at least one"):
        DataConfig(source="voc", voc=VocConfig(train=(VocSetConfig("x", "trainval"),)))


def test_evaluate_reports_the_voc07_metric_beside_coco(devkit, tmp_path):
    """Detections = the test ground truth plus one false positive per image: the evaluate
    stage's VOC07 mAP is the devkit metric of its results, in every setting."""
    voc07, voc12 = devkit
    cfg = _voc_config(voc07, voc12)
    data = tmp_path / "data"
    _run_data(cfg, data)
    split = DetectionSplit.load(data, "test")
    items = []
    for record in split.images:
        labels = np.array([split.categories.label(int(c)) for c in record.category_ids], np.int8)
        boxes = np.concatenate([record.boxes, [[0, 0, 30, 30]]]).astype(np.float32)  # + a false positive
        scores = np.concatenate([np.linspace(0.9, 0.6, len(labels)), [0.95]]).astype(np.float32)
        items.append((record.image_id, boxes, scores, np.concatenate([labels, [labels[0]]]).astype(np.int8)))
    detect, tune = tmp_path / "detect", tmp_path / "tune"
    detect.mkdir()
    tune.mkdir()
    for which in ("plain", ROUND1):
        write_raw(detect / f"raw_test_{which}.h5", items, categories=split.categories,
                  attrs={"split": "test", "set": which, "score_thresh": 0.05})
    (tune / "best.json").write_text(json.dumps({"nms_iou": 0.5, "vote_iou": None, "score_thresh": 0.05,
                                                "max_dets": 100, "baseline": {"nms_iou": 0.3}}))
    out = tmp_path / "evaluate"
    out.mkdir()
    result = evaluate_stage.run(cfg, {"data": data, "detect": detect, "tune": tune}, out, FakeContext(tmp_path))
    metrics = json.loads((out / "metrics.json").read_text())
    expected = voc_eval(split.annotation_file, out / "results_test.json")
    assert 0 < expected.mean_ap_11_point < 1
    for setting in ("final", "no_flip", "no_voting", "baseline"):
        assert metrics[setting]["voc07_mAP"] == expected.mean_ap_11_point
        assert metrics[setting]["voc12_mAP"] == expected.mean_ap_all_point
        assert "AP" in metrics[setting]["stats"]
    assert result.metrics["voc07_mAP"] == expected.mean_ap_11_point
    assert result.metrics["baseline_voc07_mAP"] == expected.mean_ap_11_point
    assert any(line.startswith("VOC mAP (IoU > 0.5): VOC07 11-point") for line in result.summary)


def test_shipped_voc_config_is_the_papers_setting():
    cfg = load_config("voc07_ion")
    assert cfg.data.source == "voc"
    assert [(Path(s.root).name, s.set) for s in cfg.data.voc.train] == [("VOC2007", "trainval"),
                                                                         ("VOC2012", "trainval")]
    assert [(Path(s.root).name, s.set) for s in cfg.data.voc.test] == [("VOC2007", "test")]
    assert [(p.iterations, p.frozen[-1], p.lr_start, p.lr_end) for p in cfg.train.phases] == [
        (40000, "conv5", 5e-3, 1e-4), (100000, "conv2", 1e-3, 1e-5)]
    assert cfg.model.imagenet_weights.endswith("vgg16.pth") and cfg.evaluate.voc_metric
