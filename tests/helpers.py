"""What several test modules share (test modules import from here, never from
each other):

- the smoke pipeline, run once per test session (tests/conftest.py's `smoke_run`):
  every stage of configs/smoke.yaml in-process, through the runner, with a real
  MLflow tracker and a local Ray, as `python -m pipeline run --stages all` does
  it, with smaller proposal shards (SMOKE_IMAGES_PER_SHARD). The stage tests read
  its artifact directories and never write into them: a test that changes files
  works on a copy (copy_artifact);
- FakeContext, a StageContext for running one stage in-process;
- a tiny detector and samples for the training loop (TinyDetector, tiny_sample);
- VOC devkit and COCO files to read (write_voc_root, coco_mini, png_header).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

import stages.proposals as proposals_stage
from ion.engine.loop import TrainSample
from pipeline.cluster.tasks import shutdown_ray
from pipeline.config import PROJECT_ROOT, Config, load_config
from pipeline.graph import registered_stages
from pipeline.runner import RunReport, run_stages
from pipeline.tracking.client import Tracker, tracking_uri_for

SMOKE_CONFIG = PROJECT_ROOT / "configs" / "smoke.yaml"
# The smoke splits hold 8-16 images, fewer than one shard of the stage's default
# size (32): smaller shards give every split several, so the resume test can
# delete one shard and see that only that one is recomputed. The shard size
# changes how the work is cut, not what is produced.
SMOKE_IMAGES_PER_SHARD = 4


@dataclass(frozen=True)
class SmokeRun:
    """The finished smoke pipeline: its config, workdir, and each stage's artifact directory."""

    cfg: Config
    workdir: Path
    dirs: dict[str, Path]  # stage name -> <workdir>/artifacts/<stage>/<key>
    report: RunReport
    images_per_shard: int


class FakeContext:
    """A StageContext that maps sequentially in-process and records every map call."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.runtime = None
        self.maps: list[tuple[object, list]] = []  # (fn, items) of each ctx.map call
        self.metrics: list[tuple[dict, int | None]] = []
        self.models: list[dict] = []  # artifacts of each log_model call

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))

    def log_params(self, params):
        pass

    def graceful_stop(self):
        return contextlib.nullcontext(lambda: False)

    def map(self, fn, items, desc, gpu=False, on_result=None):
        items = list(items)
        self.maps.append((fn, items))
        keep = on_result or (lambda _, result: result)
        return [keep(i, fn(item)) for i, item in enumerate(items)]

    def progress(self, iterable, desc, total=None, unit="items"):
        return iterable

    def log_model(self, artifacts):
        self.models.append(dict(artifacts))

    def link_to_model(self, path, relative):
        pass

    def train_placement(self, workers=None):
        return False, False  # one CPU process, as RunContext for train_workers 1 on the CPU


def copy_artifact(source: Path, parent: Path) -> Path:
    """A copy of an artifact directory under `parent`, keeping its name (the stage key:
    stages record it, e.g. as a store's config_key)."""
    target = parent / source.name
    shutil.copytree(source, target)
    return target


def run_smoke(tmp_path_factory) -> Iterator[SmokeRun]:
    """The session's `smoke_run` fixture (tests/conftest.py: shared by every test folder)."""
    workdir = tmp_path_factory.mktemp("smoke")
    with pytest.MonkeyPatch.context() as patch:
        # The tests' MLflow runs and Ray stay in the test's workdir and on this machine.
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("RAY_ADDRESS", raising=False)
        patch.setattr(proposals_stage, "IMAGES_PER_SHARD", SMOKE_IMAGES_PER_SHARD)
        cfg = load_config(SMOKE_CONFIG, workdir=workdir)
        stages = registered_stages()
        tracker = Tracker(tracking_uri=tracking_uri_for(workdir), experiment=cfg.name, workdir=workdir,
                          config_file=SMOKE_CONFIG)
        # The runner's Cluster starts Ray on the first map and shuts it down at the end (also on failure).
        report = run_stages(cfg, stages=stages, selected=stages, tracker=tracker,
                            command=f"python -m pipeline run --config {SMOKE_CONFIG} --workdir {workdir}",
                            run_name="all")
    yield SmokeRun(cfg=cfg, workdir=workdir, dirs={o.name: o.path for o in report.outcomes}, report=report,
                   images_per_shard=SMOKE_IMAGES_PER_SHARD)
    shutdown_ray()  # a no-op unless something in the session left a Ray instance running


GROUPS = ("conv1", "conv2", "conv3", "conv4", "conv5")


NUM_IMAGES = 7  # not a multiple of 4: minibatches straddle epochs


IMAGE_SIZE = 16


NUM_PROPOSALS = 8


SAMPLED_ROIS = 5


class TinyBackbone(nn.Module):
    """Five 3x3 convs named like VGG16's groups; set_frozen as ion/modeling/backbone.py."""

    def __init__(self) -> None:
        super().__init__()
        channels = (3, 4, 4, 4, 4, 4)
        strides = (1, 2, 2, 1, 1)
        for i, name in enumerate(GROUPS):
            setattr(self, name, nn.Conv2d(channels[i], channels[i + 1], 3, stride=strides[i], padding=1))

    def set_frozen(self, groups: tuple[str, ...]) -> None:
        for name in GROUPS:
            for p in getattr(self, name).parameters():
                p.requires_grad_(name not in groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in GROUPS:
            x = torch.relu(getattr(self, name)(x))
        return x  # (1, 4, H/4, W/4)


class TinyDetector(nn.Module):
    """ROI features from the backbone, a random subset of ROIs, dropout, two heads."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.backbone = TinyBackbone()
        self.dropout = nn.Dropout(0.5)
        self.cls = nn.Linear(4 * 2 * 2, num_classes + 1)
        self.box = nn.Linear(4 * 2 * 2, 4)

    def forward(self, image, proposals, targets):
        feat = self.backbone(image)
        rois = roi_align(feat, [proposals], output_size=2, spatial_scale=0.25, aligned=True)  # (P, 4, 2, 2)
        keep = torch.randperm(proposals.shape[0], device=proposals.device)[:SAMPLED_ROIS]  # ROI sampling
        x = self.dropout(rois[keep].flatten(1))  # (R, 16)
        return {"cls": F.cross_entropy(self.cls(x), targets["labels"][keep]),
                "bbox": F.smooth_l1_loss(self.box(x), targets["deltas"][keep])}


def tiny_sample(index: int, phase_index: int, rng: np.random.Generator) -> TrainSample:
    """Image `index` (fixed content), proposals shifted per phase (another proposal
    set), flipped when the position's Generator says so."""
    g = np.random.default_rng(1000 + index)
    image = torch.from_numpy(g.standard_normal((1, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32))
    xy = g.uniform(0, 10, size=(NUM_PROPOSALS, 2))
    wh = g.uniform(3, 6, size=(NUM_PROPOSALS, 2)) + phase_index
    boxes = torch.from_numpy(np.concatenate([xy, np.minimum(xy + wh, IMAGE_SIZE)], axis=1).astype(np.float32))
    labels = torch.from_numpy(g.integers(0, 4, size=NUM_PROPOSALS))
    deltas = torch.from_numpy(g.standard_normal((NUM_PROPOSALS, 4)).astype(np.float32))
    if rng.random() < 0.5:
        image = image.flip(-1)
        boxes = torch.stack([IMAGE_SIZE - boxes[:, 2], boxes[:, 1], IMAGE_SIZE - boxes[:, 0], boxes[:, 3]], dim=1)
    return TrainSample(image=image, proposals=boxes, targets={"labels": labels, "deltas": deltas})


def coco_mini() -> Path:
    # ../shared beside the checkout (tests/conftest.py), or beside the folder of a git worktree.
    checkout = Path(__file__).resolve().parents[1]
    for shared in (checkout.parent / "shared", checkout.parent.parent / "shared"):
        if (shared / "data" / "coco-mini").is_dir():
            return shared / "data" / "coco-mini"
    raise RuntimeError(f"coco-mini not found in ../shared or ../../shared of {checkout}")


def _object_xml(name, box, difficult=None, truncated=0):
    diff = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    xmin, ymin, xmax, ymax = box
    return (f"<object><name>{name}</name><pose>Unspecified</pose><truncated>{truncated}</truncated>{diff}"
            f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>"
            f"</object>")


def _annotation_xml(name, width, height, objects):
    return (f"<annotation><folder>VOC</folder><filename>{name}.jpg</filename>"
            f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{''.join(_object_xml(*o) for o in objects)}</annotation>")


def write_voc_root(root: Path, images: dict, image_set="trainval"):
    """images: VOC name -> (coco-mini photo, width, height, objects [(class, (xmin, ymin, xmax, ymax), difficult)])."""
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, (photo, width, height, objects) in images.items():
        shutil.copy(photo, root / "JPEGImages" / f"{name}.jpg")
        (root / "Annotations" / f"{name}.xml").write_text(_annotation_xml(name, width, height, objects))
    (root / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(f"{n}\n" for n in images))


# (photo, width, height) of three coco-mini val2017 photos
PHOTOS = (("000000397133.jpg", 640, 427), ("000000349860.jpg", 640, 426), ("000000011813.jpg", 333, 500))


OBJECTS_2007 = {
    "000005": [("chair", (263, 211, 324, 339), 0), ("chair", (165, 264, 253, 372), 0),
               ("person", (5, 244, 67, 374), 1), ("diningtable", (1, 1, 640, 427), None)],
    "000007": [("car", (141, 50, 500, 330), 0), ("tvmonitor", (7, 7, 7, 7), 0)],  # a one-pixel box
    "000009": [],  # no objects
}


OBJECTS_2012 = {"2008_000123": [("aeroplane", (10, 20, 300, 400), 0), ("sheep", (2, 3, 4, 5), 1)]}


def without_test_annotations(data_dir: Path, target: Path) -> Path:
    """A copy of the data stage output whose test split is like COCO test-dev: an
    image-info file without annotations (what the data stage writes for
    data.coco.test_image_info) and has_annotations false. Images stay where they are."""
    (target / "annotations").mkdir(parents=True)
    index = json.loads((data_dir / "index.json").read_text())
    for name, entry in index["splits"].items():
        entry["image_dir"] = str((data_dir / entry["image_dir"]).resolve())
        coco = json.loads((data_dir / entry["annotations"]).read_text())
        if name == "test":
            del coco["annotations"]
            entry["has_annotations"] = False
        (target / entry["annotations"]).write_text(json.dumps(coco))
    (target / "index.json").write_text(json.dumps(index))
    return target


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A 8-bit RGB PNG declaring width x height pixels with an empty IDAT: a few
    dozen bytes, enough for PIL to read the size (and refuse it as a bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"") + png_chunk(b"IEND", b"")


def assert_states_equal(a: dict, b: dict) -> None:
    """Bitwise equality of nested state dicts (weights, optimizer state)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_states_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_states_equal(x, y)
    else:
        assert a == b


CATEGORY_IDS = (3, 7)  # COCO-style ids with a gap: labels 1, 2


def write_tiny_split(root: Path, *, num_images: int = 5) -> Path:
    """A data stage output (docs/CONTRACTS.md) with `num_images` 48x64 PNGs, one
    rectangle object each (a crowd box on image 1, no object on the last image),
    and a mixed_train.h5 proposal store beside it."""
    import json

    from PIL import Image

    from proposals.store import write_store

    data, props = root / "data", root / "proposals"
    (data / "images" / "train").mkdir(parents=True)
    (data / "annotations").mkdir()
    props.mkdir()
    g = np.random.default_rng(0)
    images, annotations, items = [], [], []
    for i in range(num_images):
        pixels = g.integers(0, 60, size=(48, 64, 3), dtype=np.uint8)
        x, y, w, h = 8 + 4 * i, 10, 20, 16
        if i < num_images - 1:
            pixels[y:y + h, x:x + w] = (200, 40 * i, 90)
            annotations.append({"id": i + 1, "image_id": 100 + i, "category_id": CATEGORY_IDS[i % 2],
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(i == 1),
                                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        Image.fromarray(pixels).save(data / "images" / "train" / f"{i}.png")
        images.append({"id": 100 + i, "file_name": f"{i}.png", "width": 64, "height": 48})
        boxes = np.concatenate([g.uniform(0, 30, (20, 2)), g.uniform(34, 64, (20, 2))], 1)[:, [0, 1, 2, 3]]
        boxes[:, 3] = np.minimum(boxes[:, 3], 48)
        items.append((100 + i, boxes.astype(np.float32), np.linspace(1, 0, 20, dtype=np.float32)))
    categories = [{"id": c, "name": f"class{c}", "supercategory": "shape"} for c in CATEGORY_IDS]
    (data / "annotations" / "train.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    (data / "index.json").write_text(json.dumps({"splits": {"train": {
        "annotations": "annotations/train.json", "image_dir": "images/train", "has_annotations": True,
        "num_images": num_images}}, "categories": categories}))
    write_store(props / "mixed_train.h5", items, attrs={"source": "mix"})
    return root


def run_gpu_bench(module: str, absent: tuple[str, ...], *args: str, timeout: int) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` from the project root, after checking that importing the
    module loads none of `absent` (packages the GPU machine lacks); returns the finished run."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    check = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    imported = subprocess.run([sys.executable, "-c", check], cwd=PROJECT_ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
    assert imported.returncode == 0 and imported.stdout.strip() == "[]", imported.stdout + imported.stderr
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@contextlib.contextmanager
def tmpfs(path: Path, megabytes: int) -> Iterator[Path]:
    """A real size-limited tmpfs mounted at `path`, unmounted afterwards. These machines run as
    root; where mounting is not allowed the test fails saying so: a full disk is tested by filling
    one, never skipped."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {path} ({mounted.stderr.strip()}): the full-disk tests need root "
                    f"(mount -t tmpfs) to fill a real filesystem")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
