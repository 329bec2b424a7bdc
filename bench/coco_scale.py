"""A COCO 2014-sized data tree with tiny images, to run every stage at COCO's counts.

    python -m bench.coco_scale --out data/coco_scale --scale 1.0 [--seed 0]

Writes, under --out, the real COCO 2014 layout with COCO's image and box counts
times --scale:

    train2014/COCO_train2014_%012d.jpg      82,783 images at scale 1
    val2014/COCO_val2014_%012d.jpg          40,504 (minival = the 5000 smallest ids, the rest joins train)
    test2015/COCO_test2015_%012d.jpg        20,288: only the test-dev images (test2015 has 81,434;
                                            the pipeline reads test-dev only)
    annotations/instances_{train,val}2014.json, image_info_test-dev2015.json
    annotations/minival_ids.txt             the 5000 x scale smallest val ids (data.coco.minival_ids_file)
    mcg/{train2014,val2014,test2015}/<image stem>.mat   2000 ranked MCG boxes per image (at every scale)

The json width/height are the tiny JPEG's true size (64-96 px on the long side),
and boxes, polygons and RLEs live in its coordinates: the data stage and every
image load compare the header with width/height and reject a mismatch
(ion/data/images.py: apply_exif_for_size), so a "640 px" entry over a 96 px
file cannot run. COCO's shape mix is kept: aspect ratios 4:3, 3:4, 16:9, 1:1
and a few odd ones, most images at the largest long side.

Chunks of images are written by a process pool; every image draws from its own
seeded generator, so the tree is the same for a seed whatever the pool size.
Each chunk writes its own json fragments, which the driver concatenates in
chunk order: no process ever holds more than one chunk.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from multiprocessing import Pool
from multiprocessing import TimeoutError as PoolTimeout
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image, ImageDraw

# COCO 2014 at scale 1 (instances_{train,val}2014.json, image_info_test-dev2015.json).
TRAIN_IMAGES = 82_783
VAL_IMAGES = 40_504
TEST2015_IMAGES = 81_434
TEST_DEV_IMAGES = 20_288
MINIVAL_IMAGES = 5_000
MAX_IMAGE_ID = 581_929
BOXES_PER_IMAGE = 7.3  # 896,782 annotations over 123,287 train+val images
MAX_BOXES_PER_IMAGE = 90  # COCO's fullest image has 93
CROWD_FRACTION = 0.01
MCG_BOXES = 2000
# Per-image box counts: negative binomial with this shape; COCO's are overdispersed
# (a long tail of crowded images) with ~1-2% of the images unannotated.
BOX_COUNT_SHAPE = 3.0

LONG_SIDES = (64, 96)  # the JPEG's long side: most at 96 (COCO: most at 640), the rest anywhere between
LONG_SIDE_FULL_FRACTION = 0.85
# (w:h ratio, probability): COCO is mostly 4:3 landscape, then 3:4 portrait.
ASPECTS = ((4 / 3, 0.55), (3 / 4, 0.2), (16 / 9, 0.1), (1.0, 0.07), (None, 0.08))  # None: any in [0.5, 2]
JPEG_QUALITY = 85
CHUNK_IMAGES = 256
PROGRESS_SECONDS = 10.0

SPLIT_CODES = {"train2014": 0, "val2014": 1, "test2015": 2}

# The 80 COCO categories with their real ids (1..90, with gaps) and supercategories.
CATEGORIES = [
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"), (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"), (6, "bus", "vehicle"), (7, "train", "vehicle"), (8, "truck", "vehicle"),
    (9, "boat", "vehicle"), (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"), (14, "parking meter", "outdoor"), (15, "bench", "outdoor"),
    (16, "bird", "animal"), (17, "cat", "animal"), (18, "dog", "animal"), (19, "horse", "animal"),
    (20, "sheep", "animal"), (21, "cow", "animal"), (22, "elephant", "animal"), (23, "bear", "animal"),
    (24, "zebra", "animal"), (25, "giraffe", "animal"), (27, "backpack", "accessory"),
    (28, "umbrella", "accessory"), (31, "handbag", "accessory"), (32, "tie", "accessory"),
    (33, "suitcase", "accessory"), (34, "frisbee", "sports"), (35, "skis", "sports"),
    (36, "snowboard", "sports"), (37, "sports ball", "sports"), (38, "kite", "sports"),
    (39, "baseball bat", "sports"), (40, "baseball glove", "sports"), (41, "skateboard", "sports"),
    (42, "surfboard", "sports"), (43, "tennis racket", "sports"), (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"), (47, "cup", "kitchen"), (48, "fork", "kitchen"), (49, "knife", "kitchen"),
    (50, "spoon", "kitchen"), (51, "bowl", "kitchen"), (52, "banana", "food"), (53, "apple", "food"),
    (54, "sandwich", "food"), (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"),
    (58, "hot dog", "food"), (59, "pizza", "food"), (60, "donut", "food"), (61, "cake", "food"),
    (62, "chair", "furniture"), (63, "couch", "furniture"), (64, "potted plant", "furniture"),
    (65, "bed", "furniture"), (67, "dining table", "furniture"), (70, "toilet", "furniture"),
    (72, "tv", "electronic"), (73, "laptop", "electronic"), (74, "mouse", "electronic"),
    (75, "remote", "electronic"), (76, "keyboard", "electronic"), (77, "cell phone", "electronic"),
    (78, "microwave", "appliance"), (79, "oven", "appliance"), (80, "toaster", "appliance"),
    (81, "sink", "appliance"), (82, "refrigerator", "appliance"), (84, "book", "indoor"),
    (85, "clock", "indoor"), (86, "vase", "indoor"), (87, "scissors", "indoor"), (88, "teddy bear", "indoor"),
    (89, "hair drier", "indoor"), (90, "toothbrush", "indoor"),
]
CATEGORY_IDS = np.array([c[0] for c in CATEGORIES], dtype=np.int64)
# COCO is person-heavy (~30% of boxes) with a long tail: person gets 0.3, the rest a Zipf share.
_TAIL = 1.0 / np.arange(1, len(CATEGORIES)) ** 0.8
CATEGORY_P = np.concatenate([[0.3], 0.7 * _TAIL / _TAIL.sum()])

LICENSES = [
    {"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
     "name": "Attribution-NonCommercial-ShareAlike License"},
    {"url": "http://creativecommons.org/licenses/by-nc/2.0/", "id": 2, "name": "Attribution-NonCommercial License"},
    {"url": "http://creativecommons.org/licenses/by-nc-nd/2.0/", "id": 3,
     "name": "Attribution-NonCommercial-NoDerivs License"},
    {"url": "http://creativecommons.org/licenses/by/2.0/", "id": 4, "name": "Attribution License"},
    {"url": "http://creativecommons.org/licenses/by-sa/2.0/", "id": 5, "name": "Attribution-ShareAlike License"},
    {"url": "http://creativecommons.org/licenses/by-nd/2.0/", "id": 6, "name": "Attribution-NoDerivs License"},
    {"url": "http://flickr.com/commons/usage/", "id": 7, "name": "No known copyright restrictions"},
    {"url": "http://www.usa.gov/copyright.shtml", "id": 8, "name": "United States Government Work"},
]


@dataclass(frozen=True)
class Chunk:
    """Images `start`..`start + len(image_ids) - 1` of one folder, written by one pool task."""

    folder: str  # train2014 / val2014 / test2015
    index: int  # chunk number within the folder: fragments are joined in this order
    start: int
    image_ids: tuple[int, ...]
    annotated: bool
    seed: int
    out: str
    mcg_boxes: int


# ------------------------------------------------------------------ counts and ids


def split_counts(scale: float) -> dict[str, int]:
    """Images per folder at `scale` (test2015: the test-dev images only); at least one each."""
    return {"train2014": max(1, round(TRAIN_IMAGES * scale)), "val2014": max(2, round(VAL_IMAGES * scale)),
            "test2015": max(1, round(TEST_DEV_IMAGES * scale))}


def minival_count(scale: float, val_images: int) -> int:
    """Minival size at `scale`, leaving at least one val image for train."""
    return min(max(1, round(MINIVAL_IMAGES * scale)), val_images - 1)


def draw_image_ids(scale: float, seed: int) -> dict[str, np.ndarray]:
    """Sparse, disjoint image ids per folder, drawn from COCO's 1..581,929 like the real ones.

    test2015's 81,434 x scale ids are drawn and test-dev is a subset of them, as in COCO.
    """
    counts = split_counts(scale)
    test2015 = max(counts["test2015"], round(TEST2015_IMAGES * scale))
    total = counts["train2014"] + counts["val2014"] + test2015
    rng = np.random.default_rng([seed, 1_000])
    ids = rng.choice(MAX_IMAGE_ID, size=total, replace=False) + 1
    train, val, test = np.split(ids, [counts["train2014"], counts["train2014"] + counts["val2014"]])
    test_dev = rng.choice(test, size=counts["test2015"], replace=False)
    return {"train2014": np.sort(train), "val2014": np.sort(val), "test2015": np.sort(test_dev)}


# ------------------------------------------------------------------ one image


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of the written JPEG, COCO's shape mix at a 64-96 px long side."""
    low, high = LONG_SIDES
    long_side = high if rng.random() < LONG_SIDE_FULL_FRACTION else int(rng.integers(low, high))
    ratios, probs = zip(*ASPECTS)
    ratio = ratios[rng.choice(len(ratios), p=probs)]
    if ratio is None:
        ratio = float(np.exp(rng.uniform(math.log(0.5), math.log(2.0))))
    short_side = max(8, round(long_side / max(ratio, 1 / ratio)))
    return (long_side, short_side) if ratio >= 1 else (short_side, long_side)


def object_box(rng: np.random.Generator, width: int, height: int) -> tuple[float, float, float, float]:
    """A box (x, y, w, h) whose side spans 3-90% of the image (log-uniform, COCO's many small objects)."""
    side = math.exp(rng.uniform(math.log(0.03), math.log(0.9))) * math.sqrt(width * height)
    aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
    w = float(np.clip(side * math.sqrt(aspect), 2.0, width))
    h = float(np.clip(side / math.sqrt(aspect), 2.0, height))
    return float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), w, h


def polygon_in(rng: np.random.Generator, box: tuple[float, float, float, float]) -> np.ndarray:
    """float64 (P, 2): a jittered ellipse polygon touching all four sides of `box`."""
    x, y, w, h = box
    count = int(rng.integers(6, 14))
    angles = np.sort(rng.uniform(0, 2 * np.pi, count))
    radius = rng.uniform(0.6, 1.0, count)
    points = np.stack([np.cos(angles) * radius, np.sin(angles) * radius], axis=1)  # (P, 2) in [-1, 1]
    low, high = points.min(axis=0), points.max(axis=0)
    unit = (points - low) / np.maximum(high - low, 1e-6)  # stretched to touch the box on every side
    return np.round(np.stack([x + unit[:, 0] * w, y + unit[:, 1] * h], axis=1), 2)


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of a closed polygon (P, 2)."""
    x, y = points[:, 0], points[:, 1]
    x_next, y_next = np.append(x[1:], x[0]), np.append(y[1:], y[0])
    return float(abs(np.dot(x, y_next) - np.dot(y, x_next)) / 2)


def crowd_mask(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """bool (H, W): a few overlapping blobs, as a crowd region of many small instances looks."""
    mask = np.zeros((height, width), dtype=bool)
    x, y, w, h = object_box(rng, width, height)
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(x, x + w), rng.uniform(y, y + h)
        rx, ry = rng.uniform(1, max(w / 2, 1.5)), rng.uniform(1, max(h / 2, 1.5))
        ys, xs = np.ogrid[:height, :width]
        mask |= ((xs + 0.5 - cx) / rx) ** 2 + ((ys + 0.5 - cy) / ry) ** 2 <= 1
    if not mask.any():
        mask[int(y), int(x)] = True
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a bool (H, W) mask: column-major run lengths, zeros first."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"counts": runs, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def annotation(rng: np.random.Generator, *, ann_id: int, image_id: int, width: int, height: int) -> dict:
    """One COCO instance annotation: polygons, or an uncompressed RLE for a crowd region."""
    category_id = int(CATEGORY_IDS[rng.choice(len(CATEGORY_IDS), p=CATEGORY_P)])
    if rng.random() < CROWD_FRACTION:
        mask = crowd_mask(rng, width, height)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        bbox = [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0])]
        segmentation, area, crowd = uncompressed_rle(mask), float(mask.sum()), 1
    else:
        points = polygon_in(rng, object_box(rng, width, height))
        low, high = points.min(axis=0), points.max(axis=0)
        bbox = [float(low[0]), float(low[1]), round(float(high[0] - low[0]), 2), round(float(high[1] - low[1]), 2)]
        segmentation, area, crowd = [points.reshape(-1).tolist()], round(polygon_area(points), 2), 0
    return {"segmentation": segmentation, "area": area, "iscrowd": crowd, "image_id": image_id, "bbox": bbox,
            "category_id": category_id, "id": ann_id}


def render(rng: np.random.Generator, width: int, height: int, annotations: list[dict]) -> Image.Image:
    """A noisy background with each object filled in its category's colour, so that proposal
    methods and the detector see edges where the boxes are."""
    base = rng.integers(40, 200, 3)
    noise = rng.integers(-25, 26, (height, width, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for ann in annotations:
        colour = tuple(int(v) for v in np.random.default_rng(ann["category_id"]).integers(0, 256, 3))
        if ann["iscrowd"]:
            x, y, w, h = ann["bbox"]
            draw.rectangle((x, y, x + w - 1, y + h - 1), outline=colour)
        else:
            draw.polygon([tuple(p) for p in np.reshape(ann["segmentation"][0], (-1, 2))], fill=colour)
    return image


def first_distinct_rows(rows: np.ndarray, base: int) -> np.ndarray:
    """Ascending indices of the first occurrence of each distinct row of int64 (N, 4) values
    in [0, base): one packed integer per row (np.unique over rows is ~10x slower)."""
    keys = ((rows[:, 0] * base + rows[:, 1]) * base + rows[:, 2]) * base + rows[:, 3]
    _, first = np.unique(keys, return_index=True)
    return np.sort(first)


def mcg_boxes(rng: np.random.Generator, width: int, height: int, annotations: list[dict],
              count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` distinct ranked boxes, MCG's uint16 (N, 4) 1-based inclusive [y1, x1, y2, x2],
    and float32 (N,) scores strictly decreasing. Jittered ground-truth boxes rank first, as
    a real proposal method finds most objects among its top boxes."""
    gt = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)  # (G, 4) xywh
    jitter = np.repeat(gt, 3, axis=0) + rng.normal(0, 1.5, (3 * len(gt), 4))
    near = np.stack([jitter[:, 0], jitter[:, 1], jitter[:, 0] + jitter[:, 2], jitter[:, 1] + jitter[:, 3]], 1)
    x = np.sort(rng.integers(0, width + 1, (2 * count, 2)), axis=1)
    y = np.sort(rng.integers(0, height + 1, (2 * count, 2)), axis=1)
    random = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)
    xyxy = np.concatenate([near, random]).round()  # continuous 0-based pixel edges
    xyxy[:, [0, 2]] = np.clip(xyxy[:, [0, 2]], 0, width)
    xyxy[:, [1, 3]] = np.clip(xyxy[:, [1, 3]], 0, height)
    # The reader drops boxes under 2 px and exact duplicates: write only boxes it keeps.
    xyxy = xyxy[(xyxy[:, 2] - xyxy[:, 0] >= 2) & (xyxy[:, 3] - xyxy[:, 1] >= 2)]
    xyxy = xyxy[first_distinct_rows(xyxy.astype(np.int64), base=max(width, height) + 1)][:count]
    boxes = np.stack([xyxy[:, 1] + 1, xyxy[:, 0] + 1, xyxy[:, 3], xyxy[:, 2]], axis=1).astype(np.uint16)
    scores = np.linspace(1.0, 0.01, len(boxes), dtype=np.float32)
    return boxes, scores


def file_name(folder: str, image_id: int) -> str:
    return f"COCO_{folder}_{image_id:012d}.jpg"


def image_entry(folder: str, image_id: int, width: int, height: int, rng: np.random.Generator) -> dict:
    """COCO's image entry, every key of the real files."""
    day = int(rng.integers(0, 365))
    name = file_name(folder, image_id)
    return {"license": int(rng.integers(1, 9)), "file_name": name,
            "coco_url": f"http://images.cocodataset.org/{folder}/{name}", "height": height, "width": width,
            "date_captured": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(1_356_998_400 + day * 86_400)),
            "flickr_url": f"http://farm{int(rng.integers(1, 10))}.staticflickr.com/{image_id}.jpg", "id": image_id}


def write_image(chunk: Chunk, index: int, image_id: int) -> tuple[dict, list[dict]]:
    """Write one image's JPEG and MCG file; its image entry and annotations."""
    rng = np.random.default_rng([chunk.seed, SPLIT_CODES[chunk.folder], index])
    width, height = image_size(rng)
    entry = image_entry(chunk.folder, image_id, width, height, rng)
    mean = BOXES_PER_IMAGE
    count = min(MAX_BOXES_PER_IMAGE,
                int(rng.negative_binomial(BOX_COUNT_SHAPE, BOX_COUNT_SHAPE / (BOX_COUNT_SHAPE + mean))))
    # Ids from the image id: unique across files and the same whatever the chunking.
    anns = [annotation(rng, ann_id=image_id * 100 + k, image_id=image_id, width=width, height=height)
            for k in range(count)]
    out = Path(chunk.out)
    render(rng, width, height, anns).save(out / chunk.folder / entry["file_name"], quality=JPEG_QUALITY)
    boxes, scores = mcg_boxes(rng, width, height, anns, chunk.mcg_boxes)
    scipy.io.savemat(out / "mcg" / chunk.folder / (Path(entry["file_name"]).stem + ".mat"),
                     {"boxes": boxes, "scores": scores[:, None]}, do_compression=True)
    return entry, anns


def write_chunk(chunk: Chunk) -> tuple[int, int]:
    """Write a chunk's images and its json fragments; (images, annotations) written."""
    entries, anns = [], []
    for offset, image_id in enumerate(chunk.image_ids):
        entry, image_anns = write_image(chunk, chunk.start + offset, image_id)
        entries.append(entry)
        anns.extend(image_anns)
    parts = fragments_dir(Path(chunk.out), chunk.folder)
    write_fragment(parts / f"{chunk.index:06d}.images", entries)
    if chunk.annotated:
        write_fragment(parts / f"{chunk.index:06d}.annotations", anns)
    return len(entries), len(anns)


# ------------------------------------------------------------------ json assembly


def fragments_dir(out: Path, folder: str) -> Path:
    return out / "annotations" / f".parts_{folder}"


def write_fragment(path: Path, items: list[dict]) -> None:
    """Items as the inside of a json list (no brackets), so fragments concatenate with commas."""
    path.write_text(",".join(json.dumps(item, separators=(",", ":")) for item in items), encoding="utf-8")


def _copy_list(f, name: str, paths: list[Path]) -> None:
    f.write(f'"{name}":[')
    first = True
    for path in paths:
        text = path.read_text(encoding="utf-8")
        if text:
            f.write(text if first else "," + text)
            first = False
    f.write("]")


def assemble_json(out: Path, folder: str, target: Path, *, annotated: bool, description: str) -> None:
    """Join the chunk fragments of `folder` into one COCO json, one chunk in memory at a time."""
    parts = fragments_dir(out, folder)
    info = {"description": description, "url": "http://cocodataset.org", "version": "1.0", "year": 2014,
            "contributor": "bench.coco_scale (synthetic)", "date_created": "2015-01-27 09:11:52.357475"}
    categories = [{"supercategory": s, "id": i, "name": n} for i, n, s in CATEGORIES]
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write('{"info":' + json.dumps(info) + ',"licenses":' + json.dumps(LICENSES) + ",")
        _copy_list(f, "images", sorted(parts.glob("*.images")))
        if annotated:
            f.write(",")
            _copy_list(f, "annotations", sorted(parts.glob("*.annotations")))
        f.write(',"categories":' + json.dumps(categories) + "}")
    os.replace(tmp, target)
    shutil.rmtree(parts)


# ------------------------------------------------------------------ driver


def make_chunks(ids: dict[str, np.ndarray], *, out: Path, seed: int, mcg: int) -> list[Chunk]:
    chunks = []
    for folder, folder_ids in ids.items():
        for index, start in enumerate(range(0, len(folder_ids), CHUNK_IMAGES)):
            chunks.append(Chunk(folder=folder, index=index, start=start,
                                image_ids=tuple(int(i) for i in folder_ids[start:start + CHUNK_IMAGES]),
                                annotated=folder != "test2015", seed=seed, out=str(out), mcg_boxes=mcg))
    return chunks


def _progress_line(done: int, total: int, anns: int, started: float) -> str:
    elapsed = time.perf_counter() - started
    rate = done / max(elapsed, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    return f"{done}/{total} images, {anns} annotations, {rate:.0f} images/s, {elapsed:.0f} s elapsed, ETA {eta:.0f} s"


def run_pool(chunks: list[Chunk], workers: int) -> tuple[int, int]:
    """Write every chunk on `workers` processes, printing progress every PROGRESS_SECONDS."""
    total = sum(len(c.image_ids) for c in chunks)
    done = anns = 0
    started = last = time.perf_counter()
    with Pool(workers) as pool:
        results = pool.imap_unordered(write_chunk, chunks)
        remaining = len(chunks)
        while remaining:
            try:
                images, chunk_anns = results.next(timeout=1.0)
                done, anns, remaining = done + images, anns + chunk_anns, remaining - 1
            except PoolTimeout:
                pass
            if time.perf_counter() - last >= PROGRESS_SECONDS or not remaining:
                print(_progress_line(done, total, anns, started), flush=True)
                last = time.perf_counter()
    return done, anns


def prepare(out: Path) -> None:
    for folder in SPLIT_CODES:
        (out / folder).mkdir(parents=True, exist_ok=True)
        (out / "mcg" / folder).mkdir(parents=True, exist_ok=True)
        parts = fragments_dir(out, folder)
        if parts.exists():  # fragments of an interrupted run would join this one's
            shutil.rmtree(parts)
        parts.mkdir(parents=True)


def write_minival_ids(out: Path, val_ids: np.ndarray, scale: float) -> int:
    """The paper's minival rule (the smallest val ids), scaled, as data.coco.minival_ids_file reads it."""
    count = minival_count(scale, len(val_ids))
    (out / "annotations" / "minival_ids.txt").write_text(
        "\n".join(str(int(i)) for i in np.sort(val_ids)[:count]) + "\n", encoding="utf-8")
    return count


def du_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def generate(out: Path, *, scale: float, seed: int, workers: int | None = None, mcg: int = MCG_BOXES) -> dict:
    """Write the whole tree; returns counts and timings."""
    started = time.perf_counter()
    out = Path(out)
    prepare(out)
    ids = draw_image_ids(scale, seed)
    chunks = make_chunks(ids, out=out, seed=seed, mcg=mcg)
    workers = workers or os.cpu_count() or 1
    images, anns = run_pool(chunks, workers)
    targets = {"train2014": ("instances_train2014.json", True), "val2014": ("instances_val2014.json", True),
               "test2015": ("image_info_test-dev2015.json", False)}
    for folder, (name, annotated) in targets.items():
        assemble_json(out, folder, out / "annotations" / name, annotated=annotated,
                      description=f"COCO-sized synthetic {folder}, scale {scale}, seed {seed}")
    minival = write_minival_ids(out, ids["val2014"], scale)
    return {"images": images, "annotations": anns, "minival": minival,
            "counts": {k: len(v) for k, v in ids.items()}, "seconds": time.perf_counter() - started}


def config_overrides(out: Path) -> list[str]:
    """The -o flags that point configs/coco_scale.yaml at a tree outside <project>/data/coco_scale."""
    out = Path(out).resolve()
    return [f"data.coco.train_annotations={out}/annotations/instances_train2014.json",
            f"data.coco.train_images={out}/train2014",
            f"data.coco.val_annotations={out}/annotations/instances_val2014.json",
            f"data.coco.val_images={out}/val2014",
            f"data.coco.minival_ids_file={out}/annotations/minival_ids.txt",
            f"data.coco.test_image_info={out}/annotations/image_info_test-dev2015.json",
            f"data.coco.test_images={out}/test2015",
            f"proposals.mcg.dir={out}/mcg"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="root of the tree (configs/coco_scale.yaml "
                        "reads <project>/data/coco_scale)")
    parser.add_argument("--scale", type=float, required=True, help="fraction of COCO's counts (1.0 = full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: os.cpu_count())")
    parser.add_argument("--mcg-boxes", type=int, default=MCG_BOXES, help="MCG boxes per image")
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 1:
        parser.error("--scale must lie in (0, 1]")
    result = generate(args.out, scale=args.scale, seed=args.seed, workers=args.workers, mcg=args.mcg_boxes)
    size = du_bytes(args.out)
    print(f"wrote {result['images']} images ({result['counts']}), {result['annotations']} annotations, "
          f"minival {result['minival']}, {size / 1e6:.1f} MB in {result['seconds']:.1f} s to {args.out}")
    default = Path(__file__).resolve().parents[1] / "data" / "coco_scale"
    if args.out.resolve() != default:
        print("configs/coco_scale.yaml reads data/coco_scale; point it here with:\n  "
              + " ".join(f"-o {o}" for o in config_overrides(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
