"""Where the data stage's real-image splits read their images, and a finished
output brought to where the config now says.

The images of COCO and VOC splits stay where they are: index.json names each
split's folder (`image_dir`, absolute) and the config fields it came from
(`image_sources`: field -> folder). The data key knows the images by their
content, not their place, so a dataset copied to a faster disk and the config
pointed there keeps every key; `relocate` then rewrites index.json (and only
it) so that every later stage reads the images from the new place, and the
cached outputs after it, training included, stay valid.

    sources = split_image_sources(cfg.data)   # {"train": {"data.coco.train_images": "/abs/train2017", ...}, ...}
    moved = relocate(cfg, data_out)           # None, or the rewritten index.json and the fields that moved
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ion.data.config import DataConfig
from ion.data.split import INDEX_FILE
from ion.errors import UserError
from stages.contract import Relocation

IMAGE_SOURCES = "image_sources"  # index.json, per split: config field -> the image folder it named


def _folder(value: str | Path) -> str:
    return str(Path(value).resolve())


def split_image_sources(data: DataConfig) -> dict[str, dict[str, str]]:
    """Per split, the config fields its images come from and their folders (resolved), as
    ion/data/coco_splits.py `build_coco_splits` and ion/data/voc.py `load_voc_split` merge them;
    {} for synthetic data (its images are inside the output)."""
    if data.source == "coco":
        coco = data.coco
        train, val = {"data.coco.train_images": _folder(coco.train_images)}, {"data.coco.val_images":
                                                                               _folder(coco.val_images)}
        if coco.val_rest in ("train", "drop"):
            test = {"data.coco.test_images": _folder(coco.test_images)} if coco.test_images else {}
            return {"train": {**train, **val} if coco.val_rest == "train" else train, "minival": val, "test": test}
        return {"train": train, "minival": val, "test": val}
    if data.source == "voc":
        def sets(name: str) -> dict[str, str]:
            return {f"data.voc.{name}[{i}].root": _folder(Path(s.root) / "JPEGImages")
                    for i, s in enumerate(getattr(data.voc, name))}
        return {"train": sets("train"), "minival": sets("minival") if data.voc.minival else sets("train"),
                "test": sets("test")}
    return {}


def common_folder(sources: dict[str, str]) -> str:
    """The folder a split's file names are relative to: the common parent of its image folders."""
    return os.path.commonpath(list(sources.values()))


def relocate(cfg, out: Path) -> Relocation | None:
    """index.json of the data output `out` rewritten for the image folders the config names now;
    None when nothing moved (or for synthetic data). UserError when the folders moved apart, so
    that the file names, relative to the folders' common parent, no longer fit."""
    path = out / INDEX_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # the manifest check sets a damaged output aside; a missing one is no output
    current = split_image_sources(cfg.data)
    moved: list[str] = []
    for name, entry in index.get("splits", {}).items():
        now = current.get(name)
        if not now:
            continue
        old_dir = entry["image_dir"]
        recorded = entry.get(IMAGE_SOURCES)
        if recorded is None:  # an output written before image_sources were recorded: one folder, or none known
            if len(now) != 1:
                continue
            recorded = {field: old_dir for field in now}
        new_dir = common_folder(now)
        if new_dir == old_dir and recorded == now:
            continue
        fields = [field for field in now if recorded.get(field) != now[field]]
        for field in sorted(now, key=lambda f: f not in fields):  # a moved folder named first
            if field not in recorded or (os.path.relpath(recorded[field], old_dir)
                                         != os.path.relpath(now[field], new_dir)):
                raise UserError(
                    f"{field}: the image folders of the {name} split moved apart ({now[field]}, "
                    f"recorded {recorded.get(field, 'nothing')}); the cached data output names its images "
                    f"relative to their common folder: rebuild it under the same key (later stages stay "
                    f"cached): python -m pipeline run --stages data --force")
        entry.update(image_dir=new_dir, **{IMAGE_SOURCES: now})
        moved += [field for field in fields if field not in moved]
    if not moved:
        return None
    text = json.dumps(index, separators=(",", ":")).encode("utf-8")
    dirs = sorted({entry["image_dir"] for entry in index["splits"].values()})
    return Relocation(fields=tuple(moved), files={INDEX_FILE: text}, note=f"images read from {', '.join(dirs)}")
