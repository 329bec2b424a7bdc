"""The `data` config section: which data set, and how it is split.

    data:
      source: synthetic            # the embedded "context-shapes" scenes (ion/data/synthetic.py)
      synthetic: {num_train: 2000}

    data:
      source: coco                 # real COCO (ion/data/coco.py)
      coco:
        train_annotations: /coco/annotations/instances_train2014.json
        ...

    data:
      source: voc                  # Pascal VOC devkit folders (ion/data/voc.py)
      voc:
        train: [{root: VOCdevkit/VOC2007, set: trainval}, {root: VOCdevkit/VOC2012, set: trainval}]
        test: [{root: VOCdevkit/VOC2007, set: test}]

COCO splits follow the paper (Appendix): minival = `minival_size` images held
out of val by image id; the rest of val joins train ("trainval35k") or, for
small sets such as coco-mini, becomes the test split; otherwise test is a
separate annotation file or a test-dev image-info file without annotations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

# Smallest sky band (the far cue of the context classes) a synthetic image may have, in pixels.
MIN_SKY_HEIGHT = 40


@dataclass(frozen=True)
class SyntheticConfig:
    seed_offset: int = field(default=0, metadata={
        "help": "added to the run's seed to seed the generator (a different data set, same everything else)",
        "min": 0})
    num_train: int = field(default=2000, metadata={"help": "training images", "min": 1})
    num_minival: int = field(default=300, metadata={"help": "minival images (threshold tuning)", "min": 1})
    num_test: int = field(default=300, metadata={"help": "test images (evaluation)", "min": 1})
    min_side: int = field(default=192, metadata={
        "help": "smallest image width/height in pixels (each side drawn uniformly in [min_side, max_side])",
        "min": 64})
    max_side: int = field(default=256, metadata={"help": "largest image width/height in pixels", "min": 64})
    band_height: int = field(default=32, metadata={
        "help": "height of the neutral band at the bottom where the context objects sit", "min": 24})
    cue_gap: int = field(default=112, metadata={
        "help": "minimum pixels between the sky (the context cue) and the band: keep it beyond the "
                "receptive field of a detector without a context module; >= 96 leaves room for the large objects",
        "min": 96})
    max_overlap: float = field(default=0.3, metadata={
        "help": "largest intersection over the smaller box allowed between two placed objects (occlusion)",
        "min": 0.0, "max": 1.0})
    crowd_probability: float = field(default=0.06, metadata={
        "help": "chance that an image holds one iscrowd group of balls", "min": 0.0, "max": 1.0})
    jpeg_quality: int = field(default=92, metadata={"help": "JPEG quality of the written images", "min": 1,
                                                    "max": 100})

    def __post_init__(self) -> None:
        if self.min_side > self.max_side:
            raise ValueError(f"synthetic.min_side ({self.min_side}) must not exceed "
                             f"synthetic.max_side ({self.max_side})")
        needed = MIN_SKY_HEIGHT + self.cue_gap + self.band_height
        if self.min_side < needed:
            raise ValueError(f"synthetic.min_side ({self.min_side}) must be at least sky {MIN_SKY_HEIGHT} + "
                             f"cue_gap {self.cue_gap} + band_height {self.band_height} = {needed} pixels "
                             f"(raise min_side or lower cue_gap/band_height)")


@dataclass(frozen=True)
class CocoConfig:
    train_annotations: Optional[str] = field(default=None, metadata={
        "help": "instances_train*.json (COCO 2014 or 2017 layout)", "path": True})
    train_images: Optional[str] = field(default=None, metadata={
        "help": "folder of the training images (train2014/ or train2017/)", "path": True,
        "files": "named_by:train_annotations"})
    val_annotations: Optional[str] = field(default=None, metadata={
        "help": "instances_val*.json: minival is held out of it", "path": True})
    val_images: Optional[str] = field(default=None, metadata={"help": "folder of the val images", "path": True,
                                                              "files": "named_by:val_annotations"})
    minival_size: int = field(default=5000, metadata={
        "help": "minival = this many val images, the smallest image ids (Appendix: 5000)", "min": 1})
    minival_ids_file: Optional[str] = field(default=None, metadata={
        "help": "explicit minival image ids instead of minival_size: a COCO json (its images), a json list "
                "of ids, or a text file with one id per line", "path": True})
    val_rest: Literal["train", "drop", "test"] = field(default="train", metadata={
        "help": "where the val images outside minival go: train (the paper's trainval35k), drop (train "
                "alone, the 'train' rows of Tables 3 and 11) or test (small sets with no test annotations)"})
    test_annotations: Optional[str] = field(default=None, metadata={
        "help": "annotated test set (instances json); with val_rest: train, give this or test_image_info",
        "path": True})
    test_image_info: Optional[str] = field(default=None, metadata={
        "help": "test-dev image info json (images, no annotations): detections go to the COCO server",
        "path": True})
    test_images: Optional[str] = field(default=None, metadata={
        "help": "folder of the test images (test2015/ or test2017/)", "path": True,
        "files": "named_by:test_annotations,test_image_info"})
    on_bad_annotation: Literal["error", "drop"] = field(default="error", metadata={
        "help": "a bad image or annotation entry stops the run (error) or is dropped, counted and logged"})
    box_tolerance: float = field(default=1.0, metadata={
        "help": "boxes may stick out of their image by this many pixels; they are clipped to it", "min": 0.0})
    check_image_files: bool = field(default=True, metadata={
        "help": "check that every image file exists and has the annotated size (reads image headers)"})


@dataclass(frozen=True)
class VocSetConfig:
    root: Optional[str] = field(default=None, metadata={
        "help": "a VOC root: the folder holding Annotations/, ImageSets/Main/ and JPEGImages/ "
                "(VOCdevkit/VOC2007)", "path": True})
    set: str = field(default="trainval", metadata={
        "help": "image set: ImageSets/Main/<set>.txt (trainval, test, ...)"})


@dataclass(frozen=True)
class VocConfig:
    train: tuple[VocSetConfig, ...] = field(default=(), metadata={
        "help": "(root, set) pairs read as the training split (the paper: 07 trainval + 12 trainval)"})
    test: tuple[VocSetConfig, ...] = field(default=(), metadata={
        "help": "(root, set) pairs read as the test split (the paper: 07 test)"})
    minival: tuple[VocSetConfig, ...] = field(default=(), metadata={
        "help": "(root, set) pairs read as minival (threshold tuning); empty: minival_size training "
                "images are held out instead"})
    minival_size: int = field(default=500, metadata={
        "help": "with no minival sets: this many training images, the smallest image ids, held out as "
                "minival (the paper tuned nothing on VOC)", "min": 1})
    check_image_files: bool = field(default=True, metadata={
        "help": "check that every JPEG exists and has the size its XML states"})


@dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "coco", "voc"] = field(default="synthetic", metadata={
        "help": "synthetic: the embedded context-shapes scenes; coco: COCO-format files on disk; voc: "
                "Pascal VOC devkit folders, converted to COCO format"})
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig, metadata={
        "help": "the context-shapes generator (used when source is synthetic)"})
    coco: CocoConfig = field(default_factory=CocoConfig, metadata={
        "help": "COCO files and split rules (used when source is coco)"})
    voc: VocConfig = field(default_factory=VocConfig, metadata={
        "help": "VOC devkit folders and image sets (used when source is voc)"})
    sample_images: Optional[int] = field(default=None, metadata={
        "help": "use only the first N images (the smallest image ids) of each split, with their annotations: "
                "a quick trial run, and what `plan --calibrate` runs; null: every image. COCO and VOC files "
                "are still read and checked in full", "min": 1})

    def sampled(self, count: int) -> int:
        """How many of a split's `count` images a run uses (sample_images)."""
        return count if self.sample_images is None else min(count, self.sample_images)

    def __post_init__(self) -> None:
        if self.source == "voc":
            for name in ("train", "test"):
                sets = getattr(self.voc, name)
                if not sets:
                    raise ValueError(f"voc.{name}: give at least one {{root, set}} when source is voc")
                if any(s.root is None for s in sets):
                    raise ValueError(f"voc.{name}: every entry needs a root (the VOC2007-style folder)")
            if any(s.root is None for s in self.voc.minival):
                raise ValueError("voc.minival: every entry needs a root (the VOC2007-style folder)")
        if self.source != "coco":
            return
        coco = self.coco
        for name in ("train_annotations", "train_images", "val_annotations", "val_images"):
            if getattr(coco, name) is None:
                raise ValueError(f"coco.{name} is required when source is coco")
        tests = [name for name in ("test_annotations", "test_image_info") if getattr(coco, name) is not None]
        if coco.val_rest == "test" and tests:
            raise ValueError(f"coco.val_rest is test (the val images outside minival are the test split), "
                             f"so drop coco.{tests[0]}")
        if coco.val_rest in ("train", "drop"):
            if len(tests) != 1:
                raise ValueError(f"with coco.val_rest: {coco.val_rest}, give exactly one of "
                                 "coco.test_annotations and coco.test_image_info")
            if coco.test_images is None:
                raise ValueError("coco.test_images is required with coco.test_annotations/test_image_info")
