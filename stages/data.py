"""The data stage: validated COCO-format train / minival / test splits.

synthetic: generates the context-shapes scenes (ion/data/synthetic.py) into
`out/images/<split>/` and `out/annotations/<split>.json`.
coco: validates the COCO files (ion/data/coco.py) and writes the cleaned
splits; the images stay where they are (`image_dir` absolute in index.json).
voc: reads the VOC devkit folders (ion/data/voc.py) into COCO-format splits
(difficult boxes as iscrowd, and `difficult` kept for the VOC metric); the
images stay where they are. index.json names the source ("source": "voc"), so
the evaluate stage knows to add the VOC07 metric.

Outputs (docs/CONTRACTS.md, "Data stage outputs"): index.json (written last),
annotations/<split>.json, images/ (synthetic only), plots/preview.png.
"""
from __future__ import annotations

import io
import time
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

from ion.atomic import write_bytes_atomic, write_compact_json_atomic
from ion.data import synthetic
from ion.data.categories import CategoryMap
from ion.data.coco import ValidationReport
from ion.data.coco_splits import SPLITS, CocoSplit, build_coco_splits, sample_splits, subset
from ion.data.config import CocoConfig, SyntheticConfig, VocConfig
from ion.data.images import load_image
from ion.data.split import INDEX_FILE
from ion.data.voc import load_voc_split
from ion.errors import UserError
from stages.contract import StageContext, StageResult
from stages.data_locations import IMAGE_SOURCES, common_folder, relocate, split_image_sources

NAME = "data"
VERSION = "1"
READS = ("seed", "data")
UPSTREAM = ()
RELOCATE = relocate  # a dataset moved elsewhere: index.json points at the new place (stages/data_locations.py)

IMAGES_PER_TASK = 50
COCO_SMALL_AREA = 32**2  # COCO's "small": area < 32^2
PREVIEW_IMAGES = 8
PREVIEW_TILE = 256
PREVIEW_COLUMNS = 4
BOX_COLOUR = (255, 235, 0)
CROWD_COLOUR = (255, 0, 255)


def _write_json_atomic(path: Path, obj: dict) -> None:
    write_compact_json_atomic(path, obj)  # a piece at a time: a COCO split's text is never held whole


def run(cfg, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Write the splits of `cfg.data` into `out` (see the module docstring)."""
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    if cfg.data.source == "synthetic":
        return _run_synthetic(seed=cfg.seed, syn=cfg.data.synthetic, sample=cfg.data.sample_images, out=out,
                              ctx=ctx)
    if cfg.data.source == "voc":
        return _run_voc(voc=cfg.data.voc, sample=cfg.data.sample_images, out=out,
                        sources=split_image_sources(cfg.data))
    return _run_coco(coco=cfg.data.coco, sample=cfg.data.sample_images, out=out, ctx=ctx,
                     sources=split_image_sources(cfg.data))


# ------------------------------------------------------------------ synthetic


def generate_chunk(job: dict) -> list[synthetic.GeneratedImage]:
    """Images job["start"]..job["stop"]-1 of one split (a Ray task; returns the JPEG bytes to the driver,
    so workers need no shared filesystem: the driver writes them as each chunk arrives)."""
    return [synthetic.generate_image(seed=job["seed"], split=job["split"], index=index,
                                     image_id=job["first_image_id"] + index, **job["scene"])
            for index in range(job["start"], job["stop"])]


def _scene_params(syn: SyntheticConfig) -> dict:
    return dict(min_side=syn.min_side, max_side=syn.max_side, band_height=syn.band_height, cue_gap=syn.cue_gap,
                max_overlap=syn.max_overlap, crowd_probability=syn.crowd_probability,
                jpeg_quality=syn.jpeg_quality)


def _sample_note(sample: int | None) -> list[str]:
    return [] if sample is None else [f"sample: the first {sample} images (smallest ids) of each split "
                                      f"(data.sample_images)"]


def _run_synthetic(*, seed: int, syn: SyntheticConfig, sample: int | None, out: Path,
                   ctx: StageContext) -> StageResult:
    started = time.perf_counter()
    counts = {"train": syn.num_train, "minival": syn.num_minival, "test": syn.num_test}
    jobs, first_id = [], 1  # image ids are unique across splits, as in COCO
    for split in SPLITS:
        # A sample is the first images of the full set: the same ids, scenes and annotations.
        used = counts[split] if sample is None else min(counts[split], sample)
        for start in range(0, used, IMAGES_PER_TASK):
            jobs.append({"seed": seed + syn.seed_offset, "split": split, "start": start,
                         "stop": min(start + IMAGES_PER_TASK, used), "first_image_id": first_id,
                         "scene": _scene_params(syn)})
        first_id += counts[split]
        (out / "images" / split).mkdir(parents=True, exist_ok=True)

    def write_chunk(_: int, chunk: list[synthetic.GeneratedImage]) -> list[tuple[dict, list[dict]]]:
        # Each chunk's JPEGs are written as it arrives and dropped: the driver keeps only the
        # COCO entries, so its memory does not grow with the images' bytes.
        for item in chunk:
            write_bytes_atomic(out / "images" / item.image["file_name"], item.jpeg)
        return [(item.image, item.annotations) for item in chunk]

    chunks = ctx.map(generate_chunk, jobs, desc="synthetic images", on_result=write_chunk)
    generated: dict[str, list[tuple[dict, list[dict]]]] = {split: [] for split in SPLITS}
    for job, chunk in zip(jobs, chunks):
        generated[job["split"]].extend(chunk)
    del chunks
    index, metrics, summary = {"source": "synthetic", "splits": {}, "categories": list(synthetic.CATEGORIES)}, {}, []
    for split in SPLITS:
        coco = synthetic.coco_dataset(
            images=[image for image, _ in generated[split]],
            annotations=[ann for _, anns in generated[split] for ann in anns],
            description=f"context-shapes {split} split, seed {seed + syn.seed_offset}")
        _write_json_atomic(out / "annotations" / f"{split}.json", coco)
        index["splits"][split] = {"annotations": f"annotations/{split}.json", "image_dir": "images",
                                  "has_annotations": True, "num_images": len(coco["images"])}
        split_metrics, line = _split_counts(split, coco, per_class=True)
        metrics.update(split_metrics)
        summary.append(line)
    summary += _sample_note(sample)
    seconds = time.perf_counter() - started
    metrics["generate_seconds"] = seconds
    summary.append(f"context-shapes generated in {seconds:.1f} s; context classes (told apart only by the sky): "
                   + ", ".join(c["name"] for c in synthetic.CATEGORIES if c["id"] in synthetic.CONTEXT_CATEGORY_IDS))
    train = generated["train"][:PREVIEW_IMAGES]
    _write_preview(out / "plots" / "preview.png",
                   [(Image.open(out / "images" / image["file_name"]).convert("RGB"), anns) for image, anns in train],
                   CategoryMap.from_coco(list(synthetic.CATEGORIES)))
    _write_json_atomic(out / INDEX_FILE, index)
    return StageResult(metrics=metrics, summary=summary)


def _split_counts(split: str, coco: dict, *, per_class: bool) -> tuple[dict[str, float], str]:
    """Per-split metrics (images, boxes, small fraction, crowd; box counts per class when `per_class`)
    and a summary line."""
    anns = coco.get("annotations", [])
    boxes = [a for a in anns if not a["iscrowd"]]
    small = sum(a["area"] < COCO_SMALL_AREA for a in boxes)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    class_counts = Counter(names[a["category_id"]] for a in boxes)
    metrics = {f"{split}_images": float(len(coco["images"])), f"{split}_boxes": float(len(boxes)),
               f"{split}_crowd": float(len(anns) - len(boxes)),
               f"{split}_small_fraction": small / max(len(boxes), 1)}
    if per_class:
        metrics.update({f"{split}_class_{name}": float(n) for name, n in sorted(class_counts.items())})
    if "annotations" not in coco:
        return metrics, f"{split}: {len(coco['images'])} images, no annotations (test-dev)"
    return metrics, (f"{split}: {len(coco['images'])} images, {len(boxes)} boxes "
                     f"({100 * small / max(len(boxes), 1):.0f}% small), {len(anns) - len(boxes)} crowd")


# ------------------------------------------------------------------ coco


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def _run_coco(*, coco: CocoConfig, sample: int | None, out: Path, ctx: StageContext,
              sources: dict[str, dict[str, str]]) -> StageResult:
    report = ValidationReport()
    splits = build_coco_splits(
        train_annotations=Path(coco.train_annotations), train_images=Path(coco.train_images),
        val_annotations=Path(coco.val_annotations), val_images=Path(coco.val_images),
        minival_size=coco.minival_size, minival_ids_file=_path(coco.minival_ids_file), val_rest=coco.val_rest,
        test_annotations=_path(coco.test_annotations), test_image_info=_path(coco.test_image_info),
        test_images=_path(coco.test_images), on_bad=coco.on_bad_annotation, box_tolerance=coco.box_tolerance,
        check_image_files=coco.check_image_files, report=report,
        map_fn=lambda fn, items: ctx.map(fn, items, desc="image headers"))
    return _write_splits(sample_splits(splits, sample), out, source="coco", metrics=report.metrics(),
                         notes=report.lines() + _sample_note(sample), sources=sources)


def _write_splits(splits: dict[str, CocoSplit], out: Path, *, source: str, metrics: dict[str, float],
                  notes: list[str], sources: dict[str, dict[str, str]]) -> StageResult:
    """Write real-image splits (COCO or VOC, already COCO-format), the index and the preview.
    `sources`: per split, the config fields its images come from (stages/data_locations.py)."""
    index: dict = {"source": source, "splits": {}, "categories": splits["train"].coco["categories"]}
    summary: list[str] = []
    for name in SPLITS:
        split = splits[name]
        _write_json_atomic(out / "annotations" / f"{name}.json", split.coco)
        index["splits"][name] = {"annotations": f"annotations/{name}.json", "image_dir": str(split.image_dir),
                                 "has_annotations": split.has_annotations, "num_images": len(split.coco["images"]),
                                 IMAGE_SOURCES: sources[name]}
        # The record a moved dataset is checked against: it must name the folder the split was built from.
        assert common_folder(sources[name]) == str(split.image_dir), (name, sources[name], split.image_dir)
        # 80 COCO classes x 3 splits would bury the headline metrics: counts per class only for synthetic.
        split_metrics, line = _split_counts(name, split.coco, per_class=False)
        metrics.update(split_metrics)
        summary.append(line)
    summary += notes
    train = splits["train"]
    anns_of: dict[int, list[dict]] = {}
    for ann in train.coco["annotations"]:
        anns_of.setdefault(ann["image_id"], []).append(ann)
    previews = []
    for img in train.coco["images"][:PREVIEW_IMAGES]:
        pixels = load_image(train.image_dir / img["file_name"], expected_size=(img["width"], img["height"]))
        previews.append((Image.fromarray(pixels), anns_of.get(img["id"], [])))
    _write_preview(out / "plots" / "preview.png", previews, CategoryMap.from_coco(train.coco["categories"]))
    _write_json_atomic(out / INDEX_FILE, index)
    return StageResult(metrics=metrics, summary=summary)


# ------------------------------------------------------------------ voc


def _voc_pairs(sets) -> list[tuple[Path, str]]:
    return [(Path(s.root), s.set) for s in sets]


def _run_voc(*, voc: VocConfig, sample: int | None, out: Path, sources: dict[str, dict[str, str]]) -> StageResult:
    """07 trainval + 12 trainval style training sets, a test set, and minival (given, or held out of train)."""
    check = dict(check_image_files=voc.check_image_files)
    train = load_voc_split(_voc_pairs(voc.train), **check)
    test = load_voc_split(_voc_pairs(voc.test), **check)
    notes = []
    if voc.minival:
        minival = load_voc_split(_voc_pairs(voc.minival), **check)
    else:
        ids = sorted(img["id"] for img in train.coco["images"])
        if voc.minival_size >= len(ids):
            raise UserError(f"data.voc.minival_size: {voc.minival_size} is not fewer than the "
                            f"{len(ids)} training images (lower it, or name data.voc.minival sets)")
        held_out = set(ids[:voc.minival_size])
        minival = CocoSplit(coco=subset(train.coco, held_out), image_dir=train.image_dir)
        train = CocoSplit(coco=subset(train.coco, set(ids) - held_out), image_dir=train.image_dir)
        notes.append(f"minival: the {voc.minival_size} training images with the smallest ids, held out "
                     f"(data.voc.minival names sets instead)")
    overlap = {img["id"] for img in train.coco["images"]} & {img["id"] for img in test.coco["images"]}
    if overlap:
        raise UserError(f"data.voc: {len(overlap)} images are in both the train and the test sets (e.g. id "
                        f"{min(overlap)}): name disjoint image sets")
    return _write_splits(sample_splits({"train": train, "minival": minival, "test": test}, sample), out,
                         source="voc", metrics={}, notes=notes + _sample_note(sample), sources=sources)


# ------------------------------------------------------------------ preview


def _write_preview(path: Path, images: list[tuple[Image.Image, list[dict]]], categories: CategoryMap) -> None:
    """A grid of images with their boxes and class names (crowd regions in magenta)."""
    rows = max(1, -(-len(images) // PREVIEW_COLUMNS))
    grid = Image.new("RGB", (PREVIEW_COLUMNS * PREVIEW_TILE, rows * PREVIEW_TILE), (32, 32, 32))
    for k, (image, anns) in enumerate(images):
        scale = PREVIEW_TILE / max(image.size)
        tile = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        draw = ImageDraw.Draw(tile)
        for ann in anns:
            x, y, w, h = (v * scale for v in ann["bbox"])
            colour = CROWD_COLOUR if ann.get("iscrowd") else BOX_COLOUR
            draw.rectangle((x, y, x + max(w - 1, 0), y + max(h - 1, 0)), outline=colour)
            draw.text((x + 1, max(y - 10, 0)), categories.name(ann["category_id"]), fill=colour)
        grid.paste(tile, ((k % PREVIEW_COLUMNS) * PREVIEW_TILE, (k // PREVIEW_COLUMNS) * PREVIEW_TILE))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())
