"""The preflight: every input the selected stages will read, checked as the stages check it but
without their work, each problem one line naming the file, field or service and the fix.

- data (when it runs): the COCO annotation files parsed and validated by the data stage's own
  reader (ion/data/coco.py), every image the splits use stat-ed in parallel, a sample of them
  decoded; the split sizes are what the estimate counts.
- proposals (when it runs, with MCG): how many images of each split lack a .mat file, and what
  proposals.mcg.allow_missing makes of that; one file read to check its format.
- train (when it runs, with model.imagenet_weights): the weights' keys and shapes against the model.
- the MLflow store answering; free disk on the workdir's filesystem against the predicted outputs.
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ion.data.coco import ValidationReport
from ion.data.coco_splits import SPLITS, build_coco_splits, sample_splits
from ion.errors import UserError
from pipeline.plan.estimate import format_bytes

STAT_THREADS = 16  # image stats are I/O bound: threads overlap a network filesystem's latency
DECODE_SAMPLE = 4  # images decoded per split: a truncated or mislabelled file fails a decode, not a stat


@dataclass
class Preflight:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] | None = None  # images per split
    images: dict[str, list[tuple[int, str]]] | None = None  # (image id, file path) per split, for MCG

    def attempt(self, fn: Callable[[], Any]) -> Any:
        """fn(); a UserError becomes a problem line (and None)."""
        try:
            return fn()
        except UserError as err:
            self.problems.append(str(err))
            return None


def _thread_map(fn: Callable, items: list) -> list:
    with ThreadPoolExecutor(STAT_THREADS) as pool:
        return list(pool.map(fn, items))


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def check_coco(coco: Any, report: Preflight, sample_images: int | None = None) -> None:
    """The data stage's validation of cfg.data.coco, images stat-ed in threads, a sample decoded;
    the splits' sizes as the data stage cuts them (data.sample_images)."""
    from ion.data.images import load_image

    splits = report.attempt(lambda: build_coco_splits(
        train_annotations=Path(coco.train_annotations), train_images=Path(coco.train_images),
        val_annotations=Path(coco.val_annotations), val_images=Path(coco.val_images),
        minival_size=coco.minival_size, minival_ids_file=_path(coco.minival_ids_file), val_rest=coco.val_rest,
        test_annotations=_path(coco.test_annotations), test_image_info=_path(coco.test_image_info),
        test_images=_path(coco.test_images), on_bad=coco.on_bad_annotation, box_tolerance=coco.box_tolerance,
        check_image_files=coco.check_image_files, report=ValidationReport(), map_fn=_thread_map))
    if splits is None:
        return
    splits = sample_splits(splits, sample_images)
    report.counts = {name: len(splits[name].coco["images"]) for name in SPLITS}
    report.images = {name: [(img["id"], str(splits[name].image_dir / img["file_name"]))
                            for img in splits[name].coco["images"]] for name in SPLITS}
    for name in SPLITS:
        entries = splits[name].coco["images"]
        step = max(1, len(entries) // DECODE_SAMPLE)
        for img in entries[::step][:DECODE_SAMPLE]:
            path = splits[name].image_dir / img["file_name"]
            if report.attempt(lambda: load_image(path, expected_size=(img["width"], img["height"]))) is None:
                break


def read_data_output(data_output: Path, report: Preflight) -> None:
    """Split sizes and images from a finished data stage output (nothing to check: it is cached)."""
    index = json.loads((data_output / "index.json").read_text(encoding="utf-8"))
    report.counts, report.images = {}, {}
    for name, split in index["splits"].items():
        coco = json.loads((data_output / split["annotations"]).read_text(encoding="utf-8"))
        image_dir = Path(split["image_dir"])
        image_dir = image_dir if image_dir.is_absolute() else data_output / image_dir
        report.counts[name] = len(coco["images"])
        report.images[name] = [(img["id"], str(image_dir / img["file_name"])) for img in coco["images"]]


def check_mcg(mcg: Any, report: Preflight) -> None:
    """MCG coverage of every split (proposals.mcg.dir), as the proposals stage locates the files."""
    from proposals.mcg import locate_mcg_files, read_mcg_mat

    if report.images is None:
        return  # the data inputs have a problem already: coverage cannot be counted
    missing, total, sample = 0, 0, None
    for name, images in report.images.items():
        found = report.attempt(lambda: locate_mcg_files(mcg.dir, [(i, Path(p).name) for i, p in images],
                                                        allow_missing=True))
        if found is None:
            return
        missing += len(found.missing)
        total += len(images)
        sample = sample or next((p for p in found.paths.values() if p is not None), None)
    if missing and not mcg.allow_missing:
        report.problems.append(
            f"proposals.mcg.dir: {mcg.dir}: no MCG .mat file for {missing} of {total} images; add the files, or "
            f"set proposals.mcg.allow_missing: true to give those images no MCG boxes (RPN boxes only)")
    elif missing:
        report.notes.append(f"MCG: {missing} of {total} images have no .mat file; proposals.mcg.allow_missing: "
                            f"true gives them RPN boxes only")
    if sample is not None:
        report.attempt(lambda: read_mcg_mat(sample))


def check_weights(model: Any, num_classes: int, report: Preflight) -> None:
    """model.imagenet_weights loaded into the configured model: keys and shapes checked there."""
    if model.imagenet_weights is None:
        return
    from ion.modeling.build import build_detector

    report.attempt(lambda: build_detector(model, num_classes=max(num_classes, 1)))


def check_rpn_weights(rpn: Any, report: Preflight) -> None:
    """proposals.rpn.imagenet_weights loaded into the configured RPN: keys and shapes checked there."""
    if rpn.imagenet_weights is None:
        return
    from proposals.rpn.model import build_rpn

    report.attempt(lambda: build_rpn(rpn))


def check_disk(workdir: Path, predicted_bytes: int, report: Preflight, detail: str) -> int:
    """A problem when the workdir's filesystem has less free space than the outputs predicted; returns free bytes."""
    where = Path(workdir).resolve()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if predicted_bytes > free:
        report.problems.append(
            f"runtime.workdir: {workdir} has {format_bytes(free)} free, but the stages to run are predicted to "
            f"write {format_bytes(predicted_bytes)} ({detail}); free space there or pass --workdir on a larger disk")
    return free
