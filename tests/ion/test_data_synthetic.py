"""The context-shapes generator: determinism, exact masks, and the context rules."""
import inspect
import io
import itertools
from collections import Counter

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image, ImageDraw

from ion.data import synthetic, synthetic_drawing, synthetic_layout
from ion.data.config import MIN_SKY_HEIGHT, SyntheticConfig

DEFAULTS = SyntheticConfig()
PARAMS = dict(min_side=DEFAULTS.min_side, max_side=DEFAULTS.max_side, band_height=DEFAULTS.band_height,
              cue_gap=DEFAULTS.cue_gap, max_overlap=DEFAULTS.max_overlap,
              crowd_probability=DEFAULTS.crowd_probability, jpeg_quality=DEFAULTS.jpeg_quality)
LAYOUT_PARAMS = {k: v for k, v in PARAMS.items() if k != "jpeg_quality"}
# Around each crate, this many times its size must look the same in every scene type.
CONTEXT_WINDOW_FACTOR = 4


def _generate(index, *, seed=0, split="train", **overrides):
    return synthetic.generate_image(seed=seed, split=split, index=index, image_id=index + 1,
                                    **{**PARAMS, **overrides})


@pytest.fixture(scope="module")
def images():
    return [_generate(i) for i in range(60)]


def _decode(segmentation, height, width):
    rles = mask_utils.frPyObjects(segmentation, height, width)
    return mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles).astype(bool)


def test_same_seed_gives_identical_bytes_and_json():
    for index in (0, 7):
        a, b = _generate(index), _generate(index)
        assert a.jpeg == b.jpeg
        assert a.image == b.image and a.annotations == b.annotations
    assert _generate(3, seed=1).jpeg != _generate(3, seed=0).jpeg
    assert _generate(3, split="test").jpeg != _generate(3, split="train").jpeg


def test_masks_are_exactly_the_boxes_extent_and_area(images):
    for item in images:
        h, w = item.image["height"], item.image["width"]
        decoded = np.asarray(Image.open(io.BytesIO(item.jpeg)))
        assert decoded.shape == (h, w, 3)
        for ann in item.annotations:
            mask = _decode(ann["segmentation"], h, w)
            ys, xs = np.nonzero(mask)
            x, y, bw, bh = ann["bbox"]
            # The box is the tight box of the mask: the mask lies inside it and touches every side.
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + bw, y + bh)
            assert ann["area"] == mask.sum()
            assert ann["id"] // synthetic.ANNOTATIONS_PER_IMAGE_LIMIT == item.image["id"]


def test_annotations_are_the_drawn_pixels_occlusion_included():
    rng, _ = synthetic.image_rngs(seed=5, split="train", index=0)
    for _ in range(10):
        layout = synthetic.sample_image_layout(rng, **LAYOUT_PARAMS)
        _, labels = synthetic.render_scene(layout, "day")
        for ann in synthetic.scene_annotations(layout, "day", labels, image_id=1):
            mask = _decode(ann["segmentation"], layout.height, layout.width)
            index = ann["id"] - synthetic.ANNOTATIONS_PER_IMAGE_LIMIT
            visible = labels == index
            # Polygons cannot hold holes (COCO's neither): the mask is the visible pixels with holes filled.
            contours, _ = cv2.findContours(visible.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            filled = np.zeros_like(visible, dtype=np.uint8)
            cv2.drawContours(filled, contours, -1, 1, thickness=-1)
            assert np.array_equal(mask, filled.astype(bool)) if not ann["iscrowd"] else np.array_equal(mask, visible)


def test_mask_to_polygons_round_trips_through_pycocotools():
    rng = np.random.default_rng(0)
    for trial in range(100):
        image = Image.new("L", (40, 30), 0)
        draw = ImageDraw.Draw(image)
        if trial % 2:
            draw.polygon([tuple(p) for p in rng.uniform(2, 28, size=(5, 2))], fill=1)
        else:
            draw.ellipse(tuple(np.sort(rng.uniform(1, 29, size=(2, 2)), axis=0).ravel()), fill=1)
        mask = np.asarray(image).copy()
        mask[: rng.integers(0, 12), : rng.integers(0, 12)] = 0  # an occluder's corner
        if not mask.any():
            continue
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        filled = np.zeros_like(mask)
        cv2.drawContours(filled, contours, -1, 1, thickness=-1)
        assert np.array_equal(_decode(synthetic.mask_to_polygons(mask.astype(bool)), 30, 40), filled.astype(bool))


def test_uncompressed_rle_matches_pycocotools():
    rng = np.random.default_rng(1)
    for first in (0, 1):
        mask = rng.random((13, 17)) < 0.4
        mask[0, 0] = bool(first)
        rle = synthetic.mask_to_uncompressed_rle(mask)
        assert rle["size"] == [13, 17] and sum(rle["counts"]) == mask.size
        assert np.array_equal(_decode(rle, 13, 17), mask)
        compressed = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert mask_utils.frPyObjects(rle, 13, 17)["counts"] == compressed["counts"]


def _window(box, factor, width, height):
    """The window `factor` times the box's size around its centre, clipped to the image."""
    x1, y1, x2, y2 = box
    cx, cy, half_w, half_h = (x1 + x2) / 2, (y1 + y2) / 2, factor * (x2 - x1) / 2, factor * (y2 - y1) / 2
    return (slice(max(0, int(cy - half_h)), min(height, int(np.ceil(cy + half_h)))),
            slice(max(0, int(cx - half_w)), min(width, int(np.ceil(cx + half_w)))))


def test_context_objects_and_their_surroundings_look_the_same_in_every_scene():
    """Same layout, three scene types: only the sky differs, nothing within 4x a crate's size does
    (in the drawn pixels and in the decoded JPEGs), and the crate's class is the scene's."""
    rng, _ = synthetic.image_rngs(seed=11, split="train", index=0)
    crates = 0
    for _ in range(25):
        layout = synthetic.sample_image_layout(rng, **LAYOUT_PARAMS)
        drawn = {scene: synthetic.render_scene(layout, scene) for scene in synthetic.SCENES}
        decoded = {scene: np.asarray(Image.open(io.BytesIO(synthetic.encode_jpeg(pixels, quality=92))))
                   for scene, (pixels, _) in drawn.items()}
        for a, b in itertools.combinations(synthetic.SCENES, 2):
            differs = np.any(drawn[a][0] != drawn[b][0], axis=2)  # (H, W)
            assert differs.any()
            assert np.nonzero(differs)[0].max() < layout.sky_bottom  # only sky rows change
            assert np.array_equal(drawn[a][1], drawn[b][1])  # same objects visible everywhere
        for obj in layout.objects:
            if obj.kind != "crate":
                continue
            crates += 1
            assert obj.box[1] - layout.sky_bottom >= PARAMS["cue_gap"]
            rows, cols = _window(obj.box, CONTEXT_WINDOW_FACTOR, layout.width, layout.height)
            for a, b in itertools.combinations(synthetic.SCENES, 2):
                assert np.array_equal(drawn[a][0][rows, cols], drawn[b][0][rows, cols])
                assert np.array_equal(decoded[a][rows, cols], decoded[b][rows, cols])
        annotations = {scene: synthetic.scene_annotations(layout, scene, drawn[scene][1], image_id=1)
                       for scene in synthetic.SCENES}
        for scene, anns in annotations.items():
            for ann in anns:
                if ann["category_id"] in synthetic.CONTEXT_CATEGORY_IDS:
                    assert ann["category_id"] == synthetic.CONTEXT_CATEGORY_OF_SCENE[scene]
            others = [{k: v for k, v in ann.items() if k != "category_id"} for ann in anns]
            reference = [{k: v for k, v in ann.items() if k != "category_id"} for ann in annotations["day"]]
            assert others == reference
    assert crates >= 25


def test_context_drawing_never_sees_the_class():
    assert list(inspect.signature(synthetic_drawing.draw_context_object).parameters) == ["painter", "box", "index"]
    assert list(inspect.signature(synthetic_drawing.draw_band).parameters) == ["painter", "width", "height", "band_top"]
    assert "scene" not in inspect.signature(synthetic.sample_layout).parameters


def test_crate_class_is_the_image_scene_type(images):
    scenes = Counter(item.image[synthetic.SCENE_KEY] for item in images)
    assert set(scenes) == set(synthetic.SCENES)
    for item in images:
        for ann in item.annotations:
            if ann["category_id"] in synthetic.CONTEXT_CATEGORY_IDS:
                assert ann["category_id"] == synthetic.CONTEXT_CATEGORY_OF_SCENE[item.image[synthetic.SCENE_KEY]]


def test_counts_small_objects_crowd_and_category_ids(images):
    anns = [ann for item in images for ann in item.annotations]
    boxes = [ann for ann in anns if not ann["iscrowd"]]
    per_class = Counter(ann["category_id"] for ann in boxes)
    assert set(per_class) == {c["id"] for c in synthetic.CATEGORIES} == {1, 3, 7, 12, 18, 25, 33, 42}
    small = [ann for ann in boxes if ann["area"] < 32**2]
    assert len(small) / len(boxes) > 0.6
    assert min(min(ann["bbox"][2:]) for ann in small) >= 6
    for item in images:
        w, h = item.image["width"], item.image["height"]
        assert 192 <= w <= 256 and 192 <= h <= 256
    crowded = [_generate(i, crowd_probability=1.0) for i in range(5)]
    crowds = [ann for item in crowded for ann in item.annotations if ann["iscrowd"]]
    assert len(crowds) >= 3
    for ann in crowds:
        assert ann["category_id"] == synthetic.BALL and isinstance(ann["segmentation"]["counts"], list)


def test_placed_objects_respect_the_overlap_rule():
    rng, _ = synthetic.image_rngs(seed=2, split="minival", index=4)
    overlapping = 0
    for _ in range(40):
        layout = synthetic.sample_image_layout(rng, **LAYOUT_PARAMS)
        for a, b in itertools.combinations(layout.objects, 2):
            overlap = synthetic_layout.overlap_over_smaller(a.box, b.box)
            assert overlap <= PARAMS["max_overlap"]
            overlapping += overlap > 0
        for obj in layout.objects:
            x1, y1, x2, y2 = obj.box
            assert 0 <= x1 < x2 <= layout.width and 0 <= y1 < y2 <= layout.height
        assert MIN_SKY_HEIGHT <= layout.sky_bottom <= layout.band_top - PARAMS["cue_gap"]
    assert overlapping > 0  # occlusion happens


def test_overlap_over_smaller_box():
    assert synthetic_layout.overlap_over_smaller((0, 0, 10, 10), (5, 0, 15, 10)) == 0.5
    assert synthetic_layout.overlap_over_smaller((0, 0, 100, 100), (10, 10, 20, 20)) == 1.0
    assert synthetic_layout.overlap_over_smaller((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0


def test_config_rejects_images_too_small_for_the_cue_gap():
    with pytest.raises(ValueError, match="synthetic.min_side \\(180\\) must be at least sky 40 \\+ cue_gap 112"):
        SyntheticConfig(min_side=180)
    with pytest.raises(ValueError, match="must not exceed"):
        SyntheticConfig(min_side=250, max_side=200)
