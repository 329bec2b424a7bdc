"""Pascal VOC devkit folders read as one COCO-format split.

    split = load_voc_split([("VOCdevkit/VOC2007", "trainval"), ("VOCdevkit/VOC2012", "trainval")])
    split.coco          # COCO dict: images, annotations, categories (ids 1..20)
    split.image_dir     # the folder the images' file names are relative to

A VOC root holds `Annotations/<name>.xml`, `ImageSets/Main/<set>.txt` (one
image name per line) and `JPEGImages/<name>.jpg`. The result is a
`ion.data.coco_splits.CocoSplit`, the form the data stage writes for COCO, so VOC can
stand beside COCO as a source: file names are relative to the common parent of
the roots' JPEGImages folders, as `ion.data.coco_splits.merge` does for COCO.

Boxes. VOC pixel coordinates are 1-based and inclusive: a box covers pixels
xmin..xmax. The project's boxes are continuous (0 at the left edge of the first
pixel), so the box is [xmin - 1, ymin - 1, xmax, ymax] (`voc_box_to_xyxy`) and
its width xmax - xmin + 1 is the devkit's +1 width. The COCO bbox is
[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1].

Difficult boxes are kept and carried twice:
- `iscrowd = 1`: the flag everything in the project already honours. The
  pycocotools evaluation and the project's evaluator ignore such ground truth
  (a detection on it is neither a true nor a false positive, and it does not
  count as an object to find), and the ROI sampler never makes it a foreground
  target (ion/sampling.py). An `ignore` key would not do: pycocotools'
  `COCOeval._prepare` overwrites `gt["ignore"]` with `iscrowd`, so an ignore
  flag alone would be silently dropped and difficult boxes scored as misses.
  COCO's crowd rule is not quite the VOC one (crowd regions match by
  intersection over the detection's area and only after regular objects), so
  COCO-style AP on VOC is close to, not equal to, VOC AP.
- `difficult = 1`: the VOC devkit's own flag, which `ion.evaluation.voc_ap`
  reads to apply the devkit's rules exactly.
Every annotation also has `truncated` (0/1) from the XML.

Image ids are integers built from the VOC names so that they are the same
whichever sets are read together (proposal files are keyed by image id):
"2008_000123" -> 2008000123, and VOC2007's "000123" under a root named
VOC2007 -> 2007000123. Other names get ids 1, 2, ... in reading order. The
VOC name is kept in each image entry as `voc_name`.

Every error a user can cause (a missing folder or image-set file, malformed
XML, an unknown class name, a box outside its image) raises UserError naming
the file, the field and the fix.
"""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable

from ion.data.coco_splits import CocoSplit
from ion.data.images import stored_and_oriented_size
from ion.errors import UserError

__all__ = ["VOC_CLASSES", "voc_categories", "voc_box_to_xyxy", "voc_image_id", "read_voc_image_set",
           "load_voc_split"]

# The devkit's class order (VOCinit.m); category id = 1 + position.
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
_CATEGORY_ID = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}
_YEAR_NAME = re.compile(r"^(\d{4})_(\d{6})$")  # VOC2008+ names: 2008_000123
_PLAIN_NAME = re.compile(r"^\d{6}$")  # VOC2007 names: 000123
_YEAR_ROOT = re.compile(r"^VOC(\d{4})$")


def voc_categories() -> list[dict]:
    """The 20 VOC classes as COCO categories, ids 1..20 in the devkit's order."""
    return [{"id": _CATEGORY_ID[name], "name": name, "supercategory": "voc"} for name in VOC_CLASSES]


def voc_box_to_xyxy(xmin: float, ymin: float, xmax: float, ymax: float) -> list[float]:
    """A VOC box (1-based inclusive pixel indices) -> continuous [x1, y1, x2, y2]: [xmin-1, ymin-1, xmax, ymax].

    Pixel xmin spans [xmin - 1, xmin) in continuous coordinates, so x2 - x1 =
    xmax - xmin + 1, the devkit's width.
    """
    return [xmin - 1.0, ymin - 1.0, float(xmax), float(ymax)]


def voc_image_id(name: str, root: Path) -> int | None:
    """The integer image id of VOC image `name` under `root` (see the module docstring); None when the
    name follows neither VOC scheme."""
    match = _YEAR_NAME.match(name)
    if match:
        return int(match.group(1) + match.group(2))
    year = _YEAR_ROOT.match(Path(root).name)
    if year and _PLAIN_NAME.match(name):
        return int(year.group(1) + name)
    return None


def _folder(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{path}: {what} folder not found (point the VOC root at a folder such as "
                        f"VOCdevkit/VOC2007 that holds Annotations/, ImageSets/Main/ and JPEGImages/)")
    return path


def _read_image_set(root: Path, image_set: str) -> list[str]:
    """The image names listed in ImageSets/Main/<image_set>.txt, in file order."""
    main = _folder(root / "ImageSets" / "Main", "image-set")
    path = main / f"{image_set}.txt"
    if not path.is_file():
        # Class-specific lists (aeroplane_train.txt) are not image sets for detection.
        available = sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem)
        raise UserError(f"{path}: image-set file not found (choose one of {available} or add the file)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read the image-set file ({err})") from None
    names = [line.split()[0] for line in lines if line.strip()]  # class lists add a second column
    if not names:
        raise UserError(f"{path}: the image set is empty (list one image name per line)")
    return names


def _text(element: ET.Element, field: str, path: Path, where: str = "") -> str:
    found = element.find(field)
    if found is None or found.text is None or not found.text.strip():
        raise UserError(f"{path}: {where + ' ' if where else ''}<{element.tag}> has no <{field}> (add it, as in "
                        f"the VOC devkit's annotations)")
    return found.text.strip()


def _number(element: ET.Element, field: str, path: Path, where: str) -> float:
    text = _text(element, field, path, where)
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise UserError(f"{path}: {where} <{field}> is {text!r}, not a number (fix the value)")
    return value


def _parse_xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except FileNotFoundError:
        raise UserError(f"{path}: annotation file not found (restore it, or remove the image from the "
                        f"image-set file)") from None
    except ET.ParseError as err:
        line, column = err.position
        raise UserError(f"{path}: malformed XML at line {line}, column {column} ({err.msg}); fix or "
                        f"re-download the file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the annotation file ({err})") from None


def _read_objects(root_el: ET.Element, path: Path, width: int, height: int) -> list[dict]:
    """The XML's objects, in file order: category_id, box [x1, y1, x2, y2], difficult, truncated."""
    objects = []
    for k, obj in enumerate(root_el.findall("object")):
        where = f"object {k}"
        name = _text(obj, "name", path, where)
        if name not in _CATEGORY_ID:
            raise UserError(f"{path}: {where} <name> is {name!r}, not a VOC class (use one of "
                            f"{', '.join(VOC_CLASSES)})")
        box = obj.find("bndbox")
        if box is None:
            raise UserError(f"{path}: {where} ({name}) has no <bndbox> (add xmin, ymin, xmax, ymax)")
        xmin, ymin, xmax, ymax = (_number(box, f, path, f"{where} ({name}) bndbox")
                                  for f in ("xmin", "ymin", "xmax", "ymax"))
        # Inclusive indices: a one-pixel box has xmin == xmax; the image spans 1..width.
        if not (1 <= xmin <= xmax <= width and 1 <= ymin <= ymax <= height):
            raise UserError(f"{path}: {where} ({name}) <bndbox> xmin={xmin:g} ymin={ymin:g} xmax={xmax:g} "
                            f"ymax={ymax:g} is empty or outside the {width}x{height} image (VOC boxes need "
                            f"1 <= xmin <= xmax <= width and 1 <= ymin <= ymax <= height; fix the box)")
        objects.append({"category_id": _CATEGORY_ID[name], "box": voc_box_to_xyxy(xmin, ymin, xmax, ymax),
                        "difficult": _flag(obj, "difficult", path, where),
                        "truncated": _flag(obj, "truncated", path, where)})
    return objects


def _flag(obj: ET.Element, field: str, path: Path, where: str) -> int:
    """A 0/1 flag; absent means 0, as in the VOC2012 files that omit <difficult>."""
    found = obj.find(field)
    if found is None or found.text is None or not found.text.strip():
        return 0
    if found.text.strip() not in ("0", "1"):
        raise UserError(f"{path}: {where} <{field}> is {found.text.strip()!r} (use 0 or 1)")
    return int(found.text.strip())


def _image_size(root_el: ET.Element, path: Path) -> tuple[int, int]:
    size = root_el.find("size")
    if size is None:
        raise UserError(f"{path}: no <size> (add <size><width>W</width><height>H</height></size>)")
    width, height = (_number(size, f, path, "size") for f in ("width", "height"))
    if width < 1 or height < 1 or width != int(width) or height != int(height):
        raise UserError(f"{path}: <size> width={width:g} height={height:g} (use the image's size in pixels)")
    return int(width), int(height)


def read_voc_image_set(root: Path | str, image_set: str, *, check_image_files: bool = True,
                       first_plain_id: int = 1) -> dict:
    """One VOC root's image set as a COCO dict, file names relative to `root`/JPEGImages.

    Images in image-set order, each with `id`, `file_name` ("<name>.jpg", as the
    devkit's JPEGImages/%s.jpg), `width`, `height` (from the XML's <size>) and
    `voc_name`; annotations in XML order with `bbox` [x, y, w, h] (continuous),
    `area` = w * h, `iscrowd` = `difficult`, `truncated`, and the box as a
    one-polygon `segmentation` (VOC detection has no masks; the segmentation
    loss needs one). Annotation ids are 1.. in reading order. Names outside
    the VOC schemes get ids first_plain_id, first_plain_id + 1, ... With
    `check_image_files`, every JPEG must exist and have the XML's size.
    """
    root = _folder(Path(root), "VOC root")
    annotation_dir = _folder(root / "Annotations", "Annotations")
    image_dir = root / "JPEGImages"
    if check_image_files:
        _folder(image_dir, "JPEGImages")
    names = _read_image_set(root, image_set)
    set_file = root / "ImageSets" / "Main" / f"{image_set}.txt"
    images, annotations, plain_id = [], [], first_plain_id
    for name in names:
        xml_path = annotation_dir / f"{name}.xml"
        root_el = _parse_xml(xml_path)
        width, height = _image_size(root_el, xml_path)
        image_id = voc_image_id(name, root)
        if image_id is None:
            image_id, plain_id = plain_id, plain_id + 1
        file_name = f"{name}.jpg"
        if check_image_files:
            _check_image_file(image_dir / file_name, (width, height), xml_path)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height,
                       "voc_name": name})
        for obj in _read_objects(root_el, xml_path, width, height):
            x1, y1, x2, y2 = obj["box"]
            w, h = x2 - x1, y2 - y1
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": obj["category_id"],
                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": obj["difficult"],
                "difficult": obj["difficult"], "truncated": obj["truncated"],
                "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]]})
    seen: dict[int, str] = {}
    for img in images:
        if img["id"] in seen:
            raise UserError(f"{set_file}: image {img['voc_name']!r} is listed twice or shares id {img['id']} "
                            f"with {seen[img['id']]!r} (list every image once)")
        seen[img["id"]] = img["voc_name"]
    return {"images": images, "annotations": annotations, "categories": voc_categories()}


def _check_image_file(path: Path, size: tuple[int, int], xml_path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path}: image file not found (restore it, or remove {path.stem} from the image set)")
    stored, _ = stored_and_oriented_size(path)
    if stored != size:
        raise UserError(f"{xml_path}: <size> says {size[0]}x{size[1]} but {path} is {stored[0]}x{stored[1]} "
                        f"(fix <size> or replace the image)")


def load_voc_split(roots_and_sets: Iterable[tuple[Path | str, str]], *,
                   check_image_files: bool = True) -> CocoSplit:
    """Several (VOC root, image set) pairs, e.g. 07 trainval + 12 trainval, as one COCO-format split.

    `split.coco` is the COCO dict (images, annotations, categories 1..20; see
    `read_voc_image_set` for the entries), its file names relative to
    `split.image_dir`, the common parent of the JPEGImages folders. Annotation
    ids are renumbered 1.. over the whole split; an image in two of the sets
    raises UserError.
    """
    parts = [(Path(root), image_set) for root, image_set in roots_and_sets]
    if not parts:
        raise UserError("VOC data: no (root, image set) pairs given (name at least one, e.g. "
                        "VOCdevkit/VOC2007 with trainval)")
    read, plain_id = [], 1
    for root, image_set in parts:
        coco = read_voc_image_set(root, image_set, check_image_files=check_image_files, first_plain_id=plain_id)
        plain_id += sum(voc_image_id(img["voc_name"], root) is None for img in coco["images"])
        read.append((coco, root, image_set))
    image_dir = Path(os.path.commonpath([str((root / "JPEGImages").resolve()) for _, root, _ in read]))
    images, annotations, origin = [], [], {}
    for coco, root, image_set in read:
        prefix = Path(os.path.relpath((root / "JPEGImages").resolve(), image_dir))
        for img in coco["images"]:
            if img["id"] in origin:
                raise UserError(f"{root / 'ImageSets' / 'Main' / (image_set + '.txt')}: image "
                                f"{img['voc_name']!r} (id {img['id']}) is also in {origin[img['id']]} "
                                f"(combine disjoint image sets)")
            origin[img["id"]] = f"{root} {image_set}"
            name = img["file_name"] if str(prefix) == "." else str(prefix / img["file_name"])
            images.append({**img, "file_name": name})
        annotations += [{**ann, "id": len(annotations) + i + 1} for i, ann in enumerate(coco["annotations"])]
    return CocoSplit(coco={"images": images, "annotations": annotations, "categories": voc_categories()},
                     image_dir=image_dir)
