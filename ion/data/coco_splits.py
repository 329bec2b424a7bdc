"""The paper's train/minival/test split of COCO files read by ion/data/coco.py.

    splits = build_coco_splits(...)          # {"train": CocoSplit, "minival": ..., "test": ...}
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ion.data.coco import MapFn, ValidationReport, _is_int, _serial_map, load_json, read_coco
from ion.errors import UserError

SPLITS = ("train", "minival", "test")


@dataclass(frozen=True)
class CocoSplit:
    """One split ready to write: the COCO dict (file names relative to image_dir) and its image folder."""

    coco: dict
    image_dir: Path

    @property
    def has_annotations(self) -> bool:
        return "annotations" in self.coco


def read_id_list(path: Path) -> list[int]:
    """Image ids from a COCO json (its images), a json list of ids, or a text file of one id per line."""
    path = Path(path)
    if path.suffix == ".json":
        data = load_json(path)
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            data = [img.get("id") for img in data["images"] if isinstance(img, dict)]
        if not isinstance(data, list) or not all(_is_int(v) for v in data):
            raise UserError(f"{path}: expected a COCO json with images or a json list of integer image ids")
        return list(data)
    try:
        lines = path.read_text(encoding="utf-8").split()
    except OSError as err:
        raise UserError(f"{path}: cannot read the minival id list: {err}") from None
    try:
        return [int(v) for v in lines]
    except ValueError:
        raise UserError(f"{path}: expected one integer image id per line") from None


def minival_image_ids(*, val_image_ids: list[int], minival_size: int, ids_file: Path | None) -> set[int]:
    """The minival ids: those in `ids_file`, else the `minival_size` smallest val ids (deterministic)."""
    if ids_file is not None:
        ids = read_id_list(ids_file)
        unknown = sorted(set(ids) - set(val_image_ids))
        if unknown:
            raise UserError(f"{ids_file}: {len(unknown)} minival ids are not val images, e.g. {unknown[:5]} "
                            f"(use the id list that belongs to data.coco.val_annotations)")
        return set(ids)
    if minival_size >= len(val_image_ids):
        raise UserError(f"data.coco.minival_size: {minival_size} would hold out all {len(val_image_ids)} val "
                        f"images (set it below {len(val_image_ids)})")
    return set(sorted(val_image_ids)[:minival_size])


def subset(coco: dict, image_ids: set[int]) -> dict:
    """The images with these ids and their annotations."""
    out = {**coco, "images": [img for img in coco["images"] if img["id"] in image_ids]}
    if "annotations" in coco:
        out["annotations"] = [ann for ann in coco["annotations"] if ann["image_id"] in image_ids]
    return out


def sample_splits(splits: dict[str, CocoSplit], sample_images: int | None) -> dict[str, CocoSplit]:
    """Each split cut to its `sample_images` smallest image ids, with their annotations (all of
    it when None): deterministic, whatever order the files list the images in."""
    if sample_images is None:
        return splits
    out = {}
    for name, split in splits.items():
        ids = set(sorted(img["id"] for img in split.coco["images"])[:sample_images])
        out[name] = CocoSplit(coco=subset(split.coco, ids), image_dir=split.image_dir)
    return out


def merge(parts: list[tuple[dict, Path, Path]]) -> CocoSplit:
    """Concatenate (coco, image_dir, annotation_file) parts into one split.

    Image folders may differ (train2014/ and val2014/): the split's image_dir is
    their common parent and file names become relative to it.
    """
    first_coco, _, first_file = parts[0]
    image_dir = Path(os.path.commonpath([str(Path(d).resolve()) for _, d, _ in parts]))
    names = {c["id"]: c["name"] for c in first_coco["categories"]}
    images, annotations, image_ids, ann_ids = [], [], set(), set()
    for coco, folder, file in parts:
        if {c["id"]: c["name"] for c in coco["categories"]} != names:
            raise UserError(f"{file}: its categories differ from those of {first_file} (use annotation files "
                            f"of the same COCO release)")
        prefix = Path(os.path.relpath(Path(folder).resolve(), image_dir))
        for img in coco["images"]:
            if img["id"] in image_ids:
                raise UserError(f"{file}: image id {img['id']} also appears in an earlier annotation file "
                                f"(the files must hold disjoint images)")
            image_ids.add(img["id"])
            images.append({**img, "file_name": str(prefix / img["file_name"]) if str(prefix) != "." else
                           img["file_name"]})
        for ann in coco.get("annotations", []):
            if ann["id"] in ann_ids:
                raise UserError(f"{file}: annotation id {ann['id']} also appears in an earlier annotation file "
                                f"(the files must use disjoint annotation ids)")
            ann_ids.add(ann["id"])
            annotations.append(ann)
    merged = {key: first_coco[key] for key in ("info", "licenses") if key in first_coco}
    merged.update(images=images, annotations=annotations, categories=first_coco["categories"])
    return CocoSplit(coco=merged, image_dir=image_dir)


def build_coco_splits(*, train_annotations: Path, train_images: Path, val_annotations: Path, val_images: Path,
                      minival_size: int, minival_ids_file: Path | None, val_rest: str,
                      test_annotations: Path | None, test_image_info: Path | None, test_images: Path | None,
                      on_bad: str, box_tolerance: float, check_image_files: bool,
                      report: ValidationReport, map_fn: MapFn = _serial_map) -> dict[str, CocoSplit]:
    """The paper's splits (Appendix): minival held out of val by image id; the rest of val joins
    train ("trainval35k", val_rest="train"), is left out (val_rest="drop": train alone, the
    "train" rows of Tables 3 and 11) or is the test split (val_rest="test"); with train or
    drop, test comes from its own annotation file or a test-dev image-info file. `map_fn`: see read_coco.
    """
    common = dict(on_bad=on_bad, box_tolerance=box_tolerance, check_image_files=check_image_files, report=report,
                  map_fn=map_fn)
    train = read_coco(annotation_file=train_annotations, image_dir=train_images, **common)
    val = read_coco(annotation_file=val_annotations, image_dir=val_images, **common)
    val_ids = [img["id"] for img in val["images"]]
    held_out = minival_image_ids(val_image_ids=val_ids, minival_size=minival_size, ids_file=minival_ids_file)
    rest = subset(val, set(val_ids) - held_out)
    splits = {"minival": merge([(subset(val, held_out), val_images, val_annotations)])}
    if val_rest in ("train", "drop"):
        parts = [(train, train_images, train_annotations)]
        if val_rest == "train":
            parts.append((rest, val_images, val_annotations))
        splits["train"] = merge(parts)
        test_file = test_annotations if test_annotations is not None else test_image_info
        test = read_coco(annotation_file=test_file, image_dir=test_images,
                         annotations_required=test_annotations is not None, **common)
        split = merge([(test, test_images, test_file)])
        if test_annotations is None:  # test-dev: no annotations key at all (CONTRACTS.md)
            split.coco.pop("annotations")
        splits["test"] = split
    else:
        splits["train"] = merge([(train, train_images, train_annotations)])
        splits["test"] = merge([(rest, val_images, val_annotations)])
    for name in SPLITS:
        if not splits[name].coco["images"]:
            raise UserError(f"data.coco: the {name} split has no images (check the annotation files and "
                            f"minival settings)")
    return {name: splits[name] for name in SPLITS}
