"""The "context-shapes" synthetic data set: COCO-format scenes where context matters.

A scene, top to bottom:

    +--------------------------------------+  0
    | sky: colour + landmark = scene type  |  the far cue: day (blue, clouds), dusk (orange,
    |                                      |  setting sun), night (dark, moon and stars)
    +--------------------------------------+  sky_bottom  (40 .. H - band - cue_gap)
    | grass / water / road regions, random |  houses, trees, cars (large, told by shape),
    | layout; large and small objects      |  balls, kites (small, told by shape), crowds
    |            >= cue_gap pixels         |
    +--------------------------------------+  band_top = H - band_height
    | neutral band, the same in every scene|  crates: small, identical, on identical ground
    +--------------------------------------+  H

The crates' class is the scene type (crate_day / crate_dusk / crate_night),
and nothing near a crate depends on it: the scene type is drawn from its own
random stream and only `draw_sky` and `draw_landmark` receive it, to draw sky
rows; `draw_context_object` gets a box. A detector whose features around a
crate stop short of the sky (a receptive field below `cue_gap`) sees three
classes that look alike and can only guess; one that reads the whole image
(the IRNN of Sec. 3.2) can read the sky. The easy version, where the class follows the colour right around the
object, is solved by a plain Fast R-CNN head (measured on a prototype), so the
ground around the crates is made the same for every class. Nothing global
depends on the scene type either (no darker night scene), since a global
change is visible everywhere, next to the crates too.

Everything is deterministic from (seed, split, image index): one random
stream for the layout (sizes, regions, objects, pixel noise) and one for the
scene type, so `render_scene(layout, scene)` can draw the same layout under
each scene type (tests compare the pixels around the crates).
"""
from __future__ import annotations

import io

import cv2
import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from ion.data.categories import CONTEXT_IDS_KEY
from ion.data.synthetic_drawing import render_scene
from ion.data.synthetic_layout import (
    ANNOTATIONS_PER_IMAGE_LIMIT,
    BALL,
    CAR,
    CATEGORIES,
    CONTEXT_CATEGORY_IDS,
    CONTEXT_CATEGORY_OF_SCENE,
    HOUSE,
    KITE,
    LAYOUT_STREAM,
    MIN_VISIBLE_PIXELS,
    SCENE_KEY,
    SCENE_STREAM,
    SCENES,
    SPLIT_CODES,
    TREE,
    GeneratedImage,
    SceneLayout,
    SceneObject,
    sample_layout,
)

# ------------------------------------------------------------------ annotations


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """bool (h, w) -> COCO polygons (continuous coordinates) that rasterize back to the mask.

    Contours of the mask upsampled 2x, mapped back with (p + 0.5) / 2, pass a
    quarter pixel inside the mask's outer pixel edges, so pycocotools fills
    exactly the mask's pixels (holes filled: COCO polygons have none).
    """
    up = mask.astype(np.uint8).repeat(2, axis=0).repeat(2, axis=1)  # (2h, 2w)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        points = (contour.reshape(-1, 2).astype(np.float64) + 0.5) / 2  # (n, 2) x, y
        if len(points) >= 3:
            polygons.append([float(v) for v in points.ravel()])
    return polygons


def mask_to_uncompressed_rle(mask: np.ndarray) -> dict:
    """bool (H, W) -> COCO's uncompressed RLE {"size": [H, W], "counts": [...]}, as in COCO's crowd entries.

    Counts are run lengths over the column-major pixel order, starting with a run of zeros.
    """
    flat = mask.astype(np.uint8).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def category_of(obj: SceneObject, scene: str) -> int:
    """The COCO category id of a drawn object; a crate's comes from the scene type alone."""
    if obj.kind == "crate":
        return CONTEXT_CATEGORY_OF_SCENE[scene]
    return {"house": HOUSE, "tree": TREE, "car": CAR, "ball": BALL, "kite": KITE, "crowd": BALL}[obj.kind]


def scene_annotations(layout: SceneLayout, scene: str, labels: np.ndarray, *, image_id: int) -> list[dict]:
    """COCO annotations of the visible part of every object, from the label map uint8 (H, W)."""
    annotations = []
    height, width = labels.shape
    for i, obj in enumerate(layout.objects):
        x1, y1, x2, y2 = obj.box
        visible = labels[y1:y2, x1:x2] == i + 1  # (h, w): the object never leaves its box
        if visible.sum() < MIN_VISIBLE_PIXELS:
            continue
        ys, xs = np.nonzero(visible)
        bbox = [float(x1 + xs.min()), float(y1 + ys.min()), float(xs.max() - xs.min() + 1),
                float(ys.max() - ys.min() + 1)]
        if obj.kind == "crowd":
            full = np.zeros((height, width), dtype=bool)
            full[y1:y2, x1:x2] = visible
            segmentation = mask_to_uncompressed_rle(full)
            area = float(visible.sum())
        else:
            segmentation = [[v + (x1 if k % 2 == 0 else y1) for k, v in enumerate(polygon)]
                            for polygon in mask_to_polygons(visible)]
            area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))))
        annotations.append({
            "id": image_id * ANNOTATIONS_PER_IMAGE_LIMIT + i + 1, "image_id": image_id,
            "category_id": category_of(obj, scene), "bbox": bbox, "area": area,
            "iscrowd": int(obj.kind == "crowd"), "segmentation": segmentation})
    return annotations


# ------------------------------------------------------------------ images and data sets


def image_rngs(*, seed: int, split: str, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(layout stream, scene-type stream) of one image: independent, deterministic."""
    root = [seed % 2**63, SPLIT_CODES[split], index]
    return (np.random.default_rng(np.random.SeedSequence([*root, LAYOUT_STREAM])),
            np.random.default_rng(np.random.SeedSequence([*root, SCENE_STREAM])))


def sample_image_layout(rng: np.random.Generator, *, min_side: int, max_side: int, band_height: int,
                        cue_gap: int, max_overlap: float, crowd_probability: float) -> SceneLayout:
    """Draw the image size, then the layout."""
    width = int(rng.integers(min_side, max_side + 1))
    height = int(rng.integers(min_side, max_side + 1))
    return sample_layout(rng, width=width, height=height, band_height=band_height, cue_gap=cue_gap,
                         max_overlap=max_overlap, crowd_probability=crowd_probability)


def encode_jpeg(image: np.ndarray, *, quality: int) -> bytes:
    """uint8 (H, W, 3) -> JPEG bytes; no chroma subsampling, so 10-pixel objects keep their colours."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def generate_image(*, seed: int, split: str, index: int, image_id: int, min_side: int, max_side: int,
                   band_height: int, cue_gap: int, max_overlap: float, crowd_probability: float,
                   jpeg_quality: int) -> GeneratedImage:
    """Image `index` of `split`: JPEG, COCO image entry (file_name "<split>/<id>.jpg") and annotations."""
    layout_rng, scene_rng = image_rngs(seed=seed, split=split, index=index)
    layout = sample_image_layout(layout_rng, min_side=min_side, max_side=max_side, band_height=band_height,
                                 cue_gap=cue_gap, max_overlap=max_overlap, crowd_probability=crowd_probability)
    scene = SCENES[int(scene_rng.integers(len(SCENES)))]
    pixels, labels = render_scene(layout, scene)
    image = {"id": image_id, "file_name": f"{split}/{image_id:07d}.jpg", "width": layout.width,
             "height": layout.height, SCENE_KEY: scene}
    return GeneratedImage(jpeg=encode_jpeg(pixels, quality=jpeg_quality), image=image,
                          annotations=scene_annotations(layout, scene, labels, image_id=image_id))


def coco_dataset(*, images: list[dict], annotations: list[dict], description: str) -> dict:
    """A COCO instances dict of the context-shapes categories, with the context category ids."""
    return {
        "info": {"description": description, "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES],
        CONTEXT_IDS_KEY: list(CONTEXT_CATEGORY_IDS),
    }
