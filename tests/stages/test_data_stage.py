"""The data stage writes what docs/CONTRACTS.md ("Data stage outputs") promises."""
import dataclasses
import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

import stages.data as data_stage
from ion.data.config import CocoConfig, DataConfig, SyntheticConfig
from ion.data.split import DetectionSplit, instance_masks
from ion.data.synthetic import CONTEXT_CATEGORY_IDS
from ion.errors import UserError
from pipeline.config import PROJECT_ROOT, Config, load_config
from stages.contract import StageResult
from tests.helpers import FakeContext


def _run(cfg, out: Path) -> StageResult:
    out.mkdir(parents=True)
    return data_stage.run(cfg, {}, out, FakeContext(out.parent))


def _tiny_synthetic() -> Config:
    return dataclasses.replace(Config(), seed=3, data=DataConfig(
        synthetic=SyntheticConfig(num_train=6, num_minival=3, num_test=2, crowd_probability=0.5)))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_stage_declares_its_key_inputs():
    assert (data_stage.NAME, data_stage.READS, data_stage.UPSTREAM) == ("data", ("seed", "data"), ())


def test_synthetic_run_writes_the_contract(tmp_path):
    out = tmp_path / "out"
    result = _run(_tiny_synthetic(), out)
    index = json.loads((out / "index.json").read_text())
    assert set(index["splits"]) == {"train", "minival", "test"}
    assert [c["id"] for c in index["categories"]] == [1, 3, 7, 12, 18, 25, 33, 42]
    image_ids = []
    for name, count in (("train", 6), ("minival", 3), ("test", 2)):
        entry = index["splits"][name]
        assert entry == {"annotations": f"annotations/{name}.json", "image_dir": "images",
                         "has_annotations": True, "num_images": count}
        split = DetectionSplit.load(out, name)
        assert len(split.images) == count and split.has_annotations
        assert split.context_category_ids == CONTEXT_CATEGORY_IDS
        assert split.categories.num_classes == 8
        COCO(str(split.annotation_file))  # valid for pycocotools
        for record in split.images:
            image = record.load()
            assert image.shape == (record.height, record.width, 3)
            assert record.path.parent == out / "images" / name
            masks = instance_masks(record)
            assert masks.shape[0] == len(record.boxes) > 0
            x1, y1, x2, y2 = record.boxes[0]
            assert masks[0].any() and not masks[0][:, : int(x1)].any() and not masks[0][: int(y1)].any()
            image_ids.append(record.image_id)
        assert result.metrics[f"{name}_images"] == count
        assert result.metrics[f"{name}_boxes"] == sum(int((~r.iscrowd).sum()) for r in split.images)
    assert len(set(image_ids)) == len(image_ids)  # ids unique across splits
    assert 0.5 < result.metrics["train_small_fraction"] <= 1.0
    assert any(line.startswith("train: 6 images") for line in result.summary)
    preview = Image.open(out / "plots" / "preview.png")
    assert preview.size == (4 * 256, 2 * 256)
    assert not list(out.rglob("*.tmp"))


def test_synthetic_run_is_deterministic(tmp_path):
    _run(_tiny_synthetic(), tmp_path / "a")
    _run(_tiny_synthetic(), tmp_path / "b")
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert first.keys() == second.keys() and first == second
    other_seed = dataclasses.replace(_tiny_synthetic(), seed=4)
    _run(other_seed, tmp_path / "c")
    assert (tmp_path / "c" / "annotations" / "train.json").read_bytes() != first["annotations/train.json"]


class _ReleasingContext(FakeContext):
    """Hands each task's result to the stage's on_result, last item first (Ray hands them over in the
    order they finish), and checks that the stage lets it go."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.released = 0

    def map(self, fn, items, desc, gpu=False, on_result=None):
        assert on_result is not None, f"{desc}: the stage keeps every task's result"
        kept = [None] * len(items)
        for i in reversed(range(len(items))):
            result = fn(items[i])
            refs = [weakref.ref(image) for image in result]
            kept[i] = on_result(i, result)
            del result
            gc.collect()
            assert [ref() for ref in refs] == [None] * len(refs)  # no JPEG bytes held past their write
            self.released += len(refs)
        return kept


def test_synthetic_stage_writes_each_chunk_and_keeps_no_image_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(data_stage, "IMAGES_PER_TASK", 2)  # train: chunks of 2, 2 and 2
    cfg = _tiny_synthetic()
    (tmp_path / "streamed").mkdir()
    ctx = _ReleasingContext(tmp_path)
    data_stage.run(cfg, {}, tmp_path / "streamed", ctx)
    assert ctx.released == 6 + 3 + 2
    _run(cfg, tmp_path / "kept")  # the plain context, in item order: the same files, byte for byte
    assert _files(tmp_path / "streamed") == _files(tmp_path / "kept")


def test_coco_mini_through_the_stage(tmp_path):
    cfg = load_config(PROJECT_ROOT / "configs" / "coco_mini.yaml")
    out = tmp_path / "out"
    result = _run(cfg, out)
    index = json.loads((out / "index.json").read_text())
    for name, count in (("train", 80), ("minival", 40), ("test", 39)):
        assert index["splits"][name]["num_images"] == count
        assert Path(index["splits"][name]["image_dir"]).is_absolute()
    assert not (out / "images").exists()  # real images stay where they are
    assert result.metrics["train_crowd"] == 8 and result.metrics["train_boxes"] == 739 - 8
    test = DetectionSplit.load(out, "test")
    assert test.context_category_ids == () and test.categories.ids[-1] == 90
    record = max(test.images, key=lambda r: len(r.boxes))
    assert record.load().shape == (record.height, record.width, 3)
    assert record.boxes.dtype == np.float32 and (record.boxes[:, 2:] > record.boxes[:, :2]).all()
    assert (out / "plots" / "preview.png").is_file()


def test_coco_mini_sample_keeps_the_smallest_ids_and_their_annotations(tmp_path, shared_dir):
    cfg = load_config(PROJECT_ROOT / "configs" / "coco_mini.yaml", ["data.sample_images=5"])
    out = tmp_path / "out"
    result = _run(cfg, out)
    mini = shared_dir / "data" / "coco-mini" / "annotations"
    train_src = json.loads((mini / "instances_train2017.json").read_text())
    val_src = json.loads((mini / "instances_val2017.json").read_text())
    val_ids = sorted(img["id"] for img in val_src["images"])
    # minival: the 40 smallest val ids (minival_size), the rest of val is test; each cut to its 5 smallest.
    expected = {"train": sorted(img["id"] for img in train_src["images"])[:5], "minival": val_ids[:5],
                "test": val_ids[40:45]}
    for name, ids in expected.items():
        split = json.loads((out / "annotations" / f"{name}.json").read_text())
        assert sorted(img["id"] for img in split["images"]) == ids  # by id, whatever order the file lists
        source = train_src if name == "train" else val_src
        assert sorted(a["id"] for a in split["annotations"]) == sorted(
            a["id"] for a in source["annotations"] if a["image_id"] in set(ids))
        assert json.loads((out / "index.json").read_text())["splits"][name]["num_images"] == 5
    assert "sample: the first 5 images (smallest ids) of each split (data.sample_images)" in result.summary


def test_synthetic_sample_is_the_first_images_of_the_full_set(tmp_path):
    full = _tiny_synthetic()
    _run(full, tmp_path / "full")
    _run(dataclasses.replace(full, data=dataclasses.replace(full.data, sample_images=2)), tmp_path / "sample")
    for name in ("train", "minival", "test"):
        whole = json.loads((tmp_path / "full" / "annotations" / f"{name}.json").read_text())
        part = json.loads((tmp_path / "sample" / "annotations" / f"{name}.json").read_text())
        ids = [img["id"] for img in whole["images"]][:2]
        assert part["images"] == whole["images"][:2] and [img["id"] for img in part["images"]] == ids
        assert part["annotations"] == [a for a in whole["annotations"] if a["image_id"] in ids]
        for img in part["images"]:
            assert (tmp_path / "sample" / "images" / img["file_name"]).read_bytes() == (
                tmp_path / "full" / "images" / img["file_name"]).read_bytes()


def test_coco_with_missing_files_is_a_user_error(tmp_path, shared_dir):
    mini = shared_dir / "data" / "coco-mini"
    coco = CocoConfig(train_annotations=str(tmp_path / "nope.json"), train_images=str(mini / "train2017"),
                      val_annotations=str(mini / "annotations" / "instances_val2017.json"),
                      val_images=str(mini / "val2017"), minival_size=40, val_rest="test")
    cfg = dataclasses.replace(Config(), data=DataConfig(source="coco", coco=coco))
    with pytest.raises(UserError, match="nope.json: no such file"):
        _run(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "index.json").exists()


def test_coco_config_rules():
    with pytest.raises(ValueError, match="coco.train_annotations is required"):
        DataConfig(source="coco")
    paths = dict(train_annotations="a", train_images="b", val_annotations="c", val_images="d")
    with pytest.raises(ValueError, match="exactly one of coco.test_annotations and coco.test_image_info"):
        DataConfig(source="coco", coco=CocoConfig(**paths))
    with pytest.raises(ValueError, match="drop coco.test_image_info"):
        DataConfig(source="coco", coco=CocoConfig(**paths, val_rest="test", test_image_info="x"))
    DataConfig(source="coco", coco=CocoConfig(**paths, test_image_info="x", test_images="y"))
