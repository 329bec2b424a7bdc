"""Reading and validating COCO instance files (the paper's splits: ion/data/coco_splits.py).

    report = ValidationReport()
    coco = read_coco(annotation_file=..., image_dir=..., on_bad="error", box_tolerance=1.0,
                     check_image_files=True, report=report)

`read_coco` reads instances_*.json of COCO 2014 or 2017 (the same schema;
2014 file names carry the split, COCO_val2014_000000000042.jpg) and checks
every image and annotation entry. A bad entry raises a UserError naming the
file, the entry and the fix (`on_bad="error"`), or is dropped, counted by
reason and logged (`on_bad="drop"`). Kept as they are: COCO's category ids
(gaps included), crowd annotations (RLE), images with no annotations, extra
keys. Boxes sticking out of their image by at most `box_tolerance` pixels are
clipped (COCO has boxes a fraction of a pixel outside).
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pycocotools.mask as mask_utils

from ion.data.images import check_image_headers
from ion.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "minival", "test")
_EXAMPLES_KEPT = 3
_DROP_HINT = "or set data.coco.on_bad_annotation: drop to skip such entries"


@dataclass
class ValidationReport:
    """What validation dropped and repaired, by reason, with a few examples of each."""

    dropped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """`dropped_<reason>` and `repaired_<reason>` counts."""
        out = {f"dropped_{reason}": float(n) for reason, n in sorted(self.dropped.items())}
        out.update({f"repaired_{reason}": float(n) for reason, n in sorted(self.repaired.items())})
        return out

    def add(self, other: ValidationReport) -> None:
        """Fold another report's counts and examples into this one."""
        self.dropped.update(other.dropped)
        self.repaired.update(other.repaired)
        for reason, examples in other.examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(examples[:_EXAMPLES_KEPT - len(kept)])

    def lines(self) -> list[str]:
        """One line per reason, for logs and the run summary."""
        lines = [f"dropped {n} ({reason}), e.g. {'; '.join(self.examples.get(reason, []))}"
                 for reason, n in sorted(self.dropped.items())]
        lines += [f"repaired {n} ({reason})" for reason, n in sorted(self.repaired.items())]
        return lines


@dataclass
class _Checker:
    """Applies the error-or-drop policy to the problems found in one file."""

    file: Path
    on_bad: str
    report: ValidationReport

    def problem(self, reason: str, where: str, message: str, fix: str) -> None:
        """Raise (on_bad == "error") or count a dropped entry."""
        if self.on_bad == "error":
            raise UserError(f"{self.file}: {where}: {message} ({fix}, {_DROP_HINT})")
        self.report.dropped[reason] += 1
        examples = self.report.examples.setdefault(reason, [])
        if len(examples) < _EXAMPLES_KEPT:
            examples.append(f"{self.file.name} {where}: {message}")

    def structural(self, message: str) -> UserError:
        """A problem no policy can drop: the file as a whole is unusable."""
        return UserError(f"{self.file}: {message}")


def load_json(path: Path) -> object:
    """Parse a JSON file; missing or malformed files raise UserError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (check the path in the data config)") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON: {err.msg} at line {err.lineno}, column {err.colno} "
                        f"(re-download or regenerate the file)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read the file: {err}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_categories(raw: object, check: _Checker) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise check.structural("categories: expected a non-empty list of {\"id\", \"name\"} entries "
                               "(copy the categories of the official instances file)")
    seen: set[int] = set()
    for i, cat in enumerate(raw):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise check.structural(f"categories[{i}]: expected {{\"id\": int, \"name\": str}}, got {cat!r:.80}")
        if cat["id"] in seen:
            raise check.structural(f"categories[{i}]: category id {cat['id']} appears twice (make ids unique)")
        seen.add(cat["id"])
    return raw


# Image headers are read in tasks of this many images when a `map_fn` spreads them
# over workers: COCO's 164k files in ~80 tasks, each a few seconds of reads.
IMAGES_PER_CHECK = 2000

MapFn = Callable[[Callable, list], list]  # (fn, items) -> [fn(item) for item in items], maybe in parallel


def _serial_map(fn: Callable, items: list) -> list:
    return [fn(item) for item in items]


def _check_images(raw: object, *, image_dir: Path, check_image_files: bool, check: _Checker,
                  map_fn: MapFn = _serial_map) -> list[dict]:
    if not isinstance(raw, list):
        raise check.structural("images: expected a list of image entries")
    counts = Counter(img["id"] for img in raw if isinstance(img, dict) and _is_int(img.get("id")))
    # (where, problem or None) per entry; the file checks of the well-formed ones run
    # in `map_fn`'s tasks, and the problems are then taken in entry order, so the
    # first problem raised and the examples kept are those of a serial pass.
    entries: list[tuple[str, tuple[str, str, str] | None]] = []
    for i, img in enumerate(raw):
        where = f"images[{i}]" + (f" (id={img.get('id')})" if isinstance(img, dict) else "")
        entries.append((where, _entry_problem(img, counts)))
    files = [(i, raw[i]["file_name"], raw[i]["width"], raw[i]["height"])
             for i, (_, problem) in enumerate(entries) if problem is None]
    if check_image_files and files:
        chunks = [(str(image_dir), files[start:start + IMAGES_PER_CHECK])
                  for start in range(0, len(files), IMAGES_PER_CHECK)]
        # One chunk (a few seconds of reads at most) is read here: starting workers costs more.
        for chunk_result in (map_fn if len(chunks) > 1 else _serial_map)(check_image_headers, chunks):
            for i, problem in chunk_result:
                entries[i] = (entries[i][0], problem)
    kept = []
    for img, (where, problem) in zip(raw, entries):
        if problem is not None:
            check.problem(problem[0], where, problem[1], problem[2])
            continue
        kept.append(img)
    return kept


def _entry_problem(img: object, counts: Counter) -> tuple[str, str, str] | None:
    """(reason, message, fix) when an image entry is malformed, else None."""
    if not (isinstance(img, dict) and _is_int(img.get("id")) and isinstance(img.get("file_name"), str)
            and _is_int(img.get("width")) and _is_int(img.get("height"))):
        return "malformed_image", "expected integer id, width, height and a file_name string", "fix the entry"
    if img["width"] <= 0 or img["height"] <= 0:
        return "malformed_image", f"non-positive size {img['width']}x{img['height']}", "fix width/height"
    if counts[img["id"]] > 1:
        return ("duplicate_image_id", f"image id {img['id']} is used by {counts[img['id']]} entries (which one "
                "the annotations mean is unknown)", "give every image its own id")
    return None


def _clean_polygons(segmentation: list, check: _Checker) -> list[list[float]]:
    """Keep the polygons with an even number >= 6 of finite coordinates (COCO has a few degenerate ones)."""
    polygons = [p for p in segmentation
                if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(_is_number(v) for v in p)]
    if len(polygons) < len(segmentation):
        check.report.repaired["degenerate_polygons_removed"] += len(segmentation) - len(polygons)
    return polygons


def _check_segmentation(ann: dict, img: dict, where: str, check: _Checker) -> object | None:
    """The cleaned segmentation, or None when it is unusable (the problem is reported)."""
    seg = ann.get("segmentation")
    if seg is None:
        # Detection-only files: the box stands in for the mask (the segmentation loss, Sec. 3.3, needs one).
        x, y, w, h = ann["bbox"]
        check.report.repaired["segmentation_from_box"] += 1
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]
    if isinstance(seg, list):
        polygons = _clean_polygons(seg, check)
        if not polygons:
            check.problem("bad_segmentation", where, "segmentation has no polygon of >= 3 points",
                          "fix or remove the annotation")
            return None
        return polygons
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        problem = _rle_problem(seg, height=img["height"], width=img["width"])
        if problem is not None:
            check.problem("bad_segmentation", where, problem, "fix the RLE")
            return None
        return seg
    check.problem("bad_segmentation", where, "segmentation must be a list of polygons or an RLE dict",
                  "fix the annotation")
    return None


# COCO's compressed RLE writes 5 bits a character, offset by 48: '0' (48) .. 'o' (111).
_RLE_CHARS = frozenset(chr(c) for c in range(48, 112))


def _rle_problem(seg: dict, *, height: int, width: int) -> str | None:
    """What is wrong with an RLE segmentation, or None. size: [height, width] of
    the image; counts: run lengths (non-negative ints summing to height * width)
    or COCO's compressed string."""
    size, counts = seg["size"], seg["counts"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
        return f"RLE size must be a list of 2 integers [height, width], got {size!r:.40}"
    if size != [height, width]:
        return f"RLE size {size} differs from the image's [height, width] = [{height}, {width}]"
    if isinstance(counts, list):
        if not all(_is_int(v) and v >= 0 for v in counts):
            return "RLE counts must be non-negative integers"
        if sum(counts) != height * width:
            return f"RLE counts sum to {sum(counts)}, not height * width = {height * width}"
        return None
    if isinstance(counts, str):
        if not set(counts) <= _RLE_CHARS:
            return "compressed RLE counts hold characters outside COCO's encoding ('0'..'o')"
        return None
    return f"RLE counts must be a list of integers or a compressed string, got {type(counts).__name__}"


def segmentation_to_rle(segmentation: object, *, height: int, width: int) -> dict:
    """A COCO segmentation (polygons, uncompressed RLE, compressed RLE) -> one compressed RLE,
    as pycocotools' COCO.annToRLE does."""
    if isinstance(segmentation, list):  # polygons: their union
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):  # uncompressed RLE (COCO's crowd entries)
        return mask_utils.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    return {"size": segmentation["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _segmentation_area(seg: object, img: dict) -> float:
    return float(mask_utils.area(segmentation_to_rle(seg, height=img["height"], width=img["width"])))


def _check_box(ann: dict, img: dict, where: str, tolerance: float, check: _Checker) -> list[float] | None:
    """The box clipped to the image, or None when it is unusable (the problem is reported)."""
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        check.problem("bad_bbox", where, f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r:.80}",
                      "fix the annotation")
        return None
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        check.problem("non_positive_box", where, f"bbox {bbox} has width or height <= 0", "fix or remove it")
        return None
    W, H = img["width"], img["height"]
    if x < -tolerance or y < -tolerance or x + w > W + tolerance or y + h > H + tolerance:
        check.problem("box_outside_image", where, f"bbox {bbox} leaves image {img['id']} ({W}x{H}) by more "
                      f"than {tolerance} px", "fix the box or raise data.coco.box_tolerance")
        return None
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(W)), min(y + h, float(H))
    if (x1, y1, x2, y2) != (x, y, x + w, y + h):
        check.report.repaired["boxes_clipped"] += 1
        if x2 <= x1 or y2 <= y1:
            check.problem("non_positive_box", where, f"bbox {bbox} is empty once clipped to the image",
                          "fix or remove it")
            return None
        return [x1, y1, x2 - x1, y2 - y1]
    return [x, y, w, h]


def _check_annotations(raw: object, *, images: dict[int, dict], category_ids: set[int], dropped_image_ids: set,
                       tolerance: float, check: _Checker) -> list[dict]:
    if not isinstance(raw, list):
        raise check.structural("annotations: expected a list of annotation entries")
    seen: set[int] = set()
    kept = []
    for i, ann in enumerate(raw):
        where = f"annotations[{i}]" + (f" (id={ann.get('id')})" if isinstance(ann, dict) else "")
        if not (isinstance(ann, dict) and _is_int(ann.get("id")) and _is_int(ann.get("image_id"))
                and _is_int(ann.get("category_id"))):
            check.problem("malformed_annotation", where, "expected integer id, image_id and category_id",
                          "fix the entry")
            continue
        if ann["id"] in seen:
            check.problem("duplicate_annotation_id", where, f"annotation id {ann['id']} appears again",
                          "give every annotation its own id")
            continue
        seen.add(ann["id"])
        if ann["image_id"] in dropped_image_ids:
            check.report.dropped["annotations_of_dropped_images"] += 1
            continue
        img = images.get(ann["image_id"])
        if img is None:
            check.problem("unknown_image_id", where, f"image_id {ann['image_id']} is not in images",
                          "add the image entry or remove the annotation")
            continue
        if ann["category_id"] not in category_ids:
            check.problem("unknown_category_id", where, f"category_id {ann['category_id']} is not in categories "
                          f"{sorted(category_ids)[:10]}...", "add the category or fix the id")
            continue
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1) or isinstance(iscrowd, bool):
            check.problem("malformed_annotation", where, f"iscrowd must be 0 or 1, got {iscrowd!r}", "fix it")
            continue
        bbox = _check_box(ann, img, where, tolerance, check)
        if bbox is None:
            continue
        seg = _check_segmentation({**ann, "bbox": bbox}, img, where, check)
        if seg is None:
            continue
        area = ann.get("area")
        if not _is_number(area) or area < 0:
            area = _segmentation_area(seg, img)
            check.report.repaired["area_computed"] += 1
        kept.append({**ann, "bbox": bbox, "segmentation": seg, "iscrowd": int(iscrowd), "area": float(area)})
    return kept


def read_coco(*, annotation_file: Path, image_dir: Path, on_bad: str, box_tolerance: float,
              check_image_files: bool, report: ValidationReport, annotations_required: bool = True,
              map_fn: MapFn = _serial_map) -> dict:
    """Read and validate one COCO instances file (or, with annotations_required=False, an image-info file).

    Returns the cleaned COCO dict: the kept images and annotations, the
    categories, and `info`/`licenses` when present. An image-info file (test-dev)
    comes back without an "annotations" key. `map_fn` runs the image-file checks
    (header reads), e.g. over a worker pool; by default one after the other.
    """
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    check = _Checker(file=annotation_file, on_bad=on_bad, report=ValidationReport())
    data = load_json(annotation_file)
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        raise check.structural("expected a COCO instances file: a mapping with images, annotations and "
                               "categories (is this the right file?)")
    if annotations_required and "annotations" not in data:
        raise check.structural("has no annotations (an image-info file such as test-dev's? Name it in "
                               "data.coco.test_image_info instead)")
    if check_image_files and not image_dir.is_dir():
        raise UserError(f"{image_dir}: image folder not found (fix the *_images path in the data config)")
    categories = _check_categories(data["categories"], check)
    images = _check_images(data["images"], image_dir=image_dir, check_image_files=check_image_files, check=check,
                           map_fn=map_fn)
    kept_ids = {img["id"] for img in images}
    all_ids = {img.get("id") for img in data["images"] if isinstance(img, dict)}
    out = {key: data[key] for key in ("info", "licenses") if key in data}
    out.update(images=images, categories=categories)
    if "annotations" in data:
        out["annotations"] = _check_annotations(
            data["annotations"], images={img["id"]: img for img in images},
            category_ids={c["id"] for c in categories}, dropped_image_ids=all_ids - kept_ids,
            tolerance=box_tolerance, check=check)
    for line in check.report.lines():
        log.warning("%s: %s", annotation_file, line)
    report.add(check.report)
    return out
