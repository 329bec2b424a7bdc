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
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, ImageDraw

from ion.data.categories import CONTEXT_IDS_KEY
from ion.data.config import MIN_SKY_HEIGHT

# Non-contiguous on purpose, like COCO's ids: the model's labels are 1..K only
# through ion.data.categories.CategoryMap.
HOUSE, TREE, CAR, BALL, KITE, CRATE_DAY, CRATE_DUSK, CRATE_NIGHT = 1, 3, 7, 12, 18, 25, 33, 42
CATEGORIES = (
    {"id": HOUSE, "name": "house", "supercategory": "large"},
    {"id": TREE, "name": "tree", "supercategory": "large"},
    {"id": CAR, "name": "car", "supercategory": "large"},
    {"id": BALL, "name": "ball", "supercategory": "small"},
    {"id": KITE, "name": "kite", "supercategory": "small"},
    {"id": CRATE_DAY, "name": "crate_day", "supercategory": "context"},
    {"id": CRATE_DUSK, "name": "crate_dusk", "supercategory": "context"},
    {"id": CRATE_NIGHT, "name": "crate_night", "supercategory": "context"},
)
SCENES = ("day", "dusk", "night")
CONTEXT_CATEGORY_OF_SCENE = {"day": CRATE_DAY, "dusk": CRATE_DUSK, "night": CRATE_NIGHT}
CONTEXT_CATEGORY_IDS = tuple(CONTEXT_CATEGORY_OF_SCENE.values())
# Extra key of each COCO image entry (pycocotools ignores it): the scene type.
SCENE_KEY = "ion_scene"

SPLIT_CODES = {"train": 0, "minival": 1, "test": 2}
_LAYOUT_STREAM, _SCENE_STREAM = 0, 1
# Annotation id = image id * this + object index: unique without coordination between workers.
ANNOTATIONS_PER_IMAGE_LIMIT = 1000

Colour = tuple[int, int, int]
# Saturated colours used nowhere else, plus a landmark per scene type (clouds, a setting sun, a
# moon and stars): a cue a small CNN picks up early. Only sky rows carry them.
SKY_COLOURS: dict[str, Colour] = {"day": (60, 150, 255), "dusk": (255, 110, 25), "night": (12, 10, 45)}
# Added to the sky colour at the horizon, fading to 0 at the top: a sky, not a flat strip.
SKY_HORIZON_TINT = (30, 25, 30)
CLOUD_COLOUR: Colour = (245, 248, 252)
SUN_COLOUR: Colour = (225, 40, 20)
MOON_COLOUR: Colour = (240, 240, 215)
STAR_COLOUR: Colour = (255, 255, 235)
CLOUDS_PER_SKY = (1, 3)
STARS_PER_SKY = (20, 40)
BAND_COLOUR: Colour = (178, 172, 158)
KERB_COLOUR: Colour = (70, 68, 64)
KERB_HEIGHT = 3
CRATE_FILL: Colour = (226, 190, 40)
CRATE_EDGE: Colour = (96, 62, 20)
REGION_COLOURS: dict[str, Colour] = {"grass": (76, 150, 62), "water": (28, 100, 130), "road": (88, 88, 94)}
REGION_JITTER = 16
WALL_COLOURS: tuple[Colour, ...] = ((205, 185, 140), (225, 222, 210), (185, 160, 150), (150, 170, 195))
ROOF_COLOURS: tuple[Colour, ...] = ((140, 40, 30), (95, 62, 52), (62, 62, 74))
CROWN_COLOURS: tuple[Colour, ...] = ((22, 92, 34), (40, 110, 28), (18, 70, 48))
TRUNK_COLOUR: Colour = (105, 70, 40)
TOY_COLOURS: tuple[Colour, ...] = ((220, 40, 40), (40, 80, 220), (240, 240, 240), (200, 50, 200),
                                  (40, 200, 200), (120, 60, 200))
CAR_COLOURS: tuple[Colour, ...] = ((200, 30, 30), (30, 60, 180), (235, 235, 235), (30, 30, 30), (230, 200, 30))
WINDOW_COLOUR: Colour = (170, 205, 225)
DARK: Colour = (25, 25, 25)
PIXEL_NOISE = 5  # +- grey levels of per-pixel noise, so no region is perfectly flat

# Object counts per image (inclusive ranges) and sizes in pixels.
LARGE_PER_IMAGE = (1, 4)
SMALL_PER_IMAGE = (1, 6)
CRATES_PER_IMAGE = (1, 4)
CRATE_SIDE = (10, 16)
BALL_DIAMETER = (8, 20)
KITE_WIDTH = (8, 16)
HOUSE_WIDTH = (40, 76)
TREE_CROWN = (30, 56)
CAR_WIDTH = (48, 84)
CROWD_BALLS = (7, 12)
CROWD_BALL_DIAMETER = (6, 10)
CROWD_RADIUS = (10, 18)
# Large objects may reach this fraction of their height into the sky.
LARGE_INTO_SKY = 0.25
PLACEMENT_TRIES = 30
MIN_VISIBLE_PIXELS = 12

Box = tuple[int, int, int, int]  # integer [x1, y1, x2, y2): pixels x1..x2-1, y1..y2-1


@dataclass(frozen=True)
class Region:
    """A patch of ground drawn under everything: `shape` is "rect", "ellipse" or "polygon"."""

    kind: str
    shape: str
    points: tuple[tuple[float, float], ...]
    colour: Colour


@dataclass(frozen=True)
class SceneObject:
    """An object to draw inside `box`; `kind` is a class name, "crate" or "crowd"."""

    kind: str
    box: Box
    colours: tuple[Colour, ...] = ()
    balls: tuple[tuple[int, int, int], ...] = ()  # crowd members: (cx, cy, radius)


@dataclass(frozen=True)
class SceneLayout:
    """Everything about a scene except its type: geometry, colours, noise seed."""

    width: int
    height: int
    sky_bottom: int
    band_top: int
    regions: tuple[Region, ...]
    objects: tuple[SceneObject, ...]  # back to front
    noise_seed: int
    # Where each scene type's landmark goes; which one is drawn is the scene type's choice.
    landmark_x: int
    clouds: tuple[tuple[int, int, int, int], ...]  # (cx, cy, width, height), drawn in day skies
    stars: tuple[tuple[int, int, int], ...]  # (x, y, size), drawn in night skies


@dataclass(frozen=True)
class GeneratedImage:
    """One image: JPEG bytes and its COCO image entry and annotations."""

    jpeg: bytes
    image: dict
    annotations: list[dict]


# ------------------------------------------------------------------ sampling


def _int_in(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    """Uniform integer in the inclusive range `bounds`."""
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _pick(rng: np.random.Generator, options: tuple) -> object:
    return options[int(rng.integers(len(options)))]


def _jitter(rng: np.random.Generator, colour: Colour, amount: int) -> Colour:
    shifted = np.asarray(colour) + rng.integers(-amount, amount + 1, size=3)
    return tuple(int(c) for c in np.clip(shifted, 0, 255))


def overlap_over_smaller(a: Box, b: Box) -> float:
    """Intersection area / area of the smaller box: occlusion as the hidden object sees it.

    IoU would let a small box sit entirely on a big one (IoU small, the small one
    hidden); the prototype found 2-3% of large objects more than half hidden under
    an IoU rule.
    """
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _place(rng: np.random.Generator, propose: Callable[[], SceneObject], placed: list[SceneObject],
           max_overlap: float) -> SceneObject | None:
    """Draw proposals until one overlaps every placed object by at most `max_overlap`."""
    for _ in range(PLACEMENT_TRIES):
        candidate = propose()
        if all(overlap_over_smaller(candidate.box, other.box) <= max_overlap for other in placed):
            return candidate
    return None


def _sample_regions(rng: np.random.Generator, *, width: int, sky_bottom: int, band_top: int) -> tuple[Region, ...]:
    """A ground colour for the middle zone plus 0-3 patches of water, road or grass at random places."""
    base_kind = str(_pick(rng, ("grass", "grass", "grass", "water", "road")))
    regions = [Region(kind=base_kind, shape="rect", points=((0, sky_bottom), (width - 1, band_top - 1)),
                      colour=_jitter(rng, REGION_COLOURS[base_kind], REGION_JITTER))]
    for _ in range(int(rng.integers(0, 4))):
        kind = str(_pick(rng, ("grass", "water", "road")))
        colour = _jitter(rng, REGION_COLOURS[kind], REGION_JITTER)
        if kind == "water":  # a lake
            cx, cy = rng.uniform(0, width), rng.uniform(sky_bottom, band_top)
            rx, ry = rng.uniform(20, 80), rng.uniform(10, 35)
            regions.append(Region(kind=kind, shape="ellipse", points=((cx - rx, cy - ry), (cx + rx, cy + ry)),
                                  colour=colour))
        elif kind == "road":  # a strip across the image at a random slope
            y_left, y_right = rng.uniform(sky_bottom, band_top, size=2)
            half = rng.uniform(7, 15)
            regions.append(Region(kind=kind, shape="polygon", colour=colour, points=(
                (0, y_left - half), (width - 1, y_right - half), (width - 1, y_right + half), (0, y_left + half))))
        else:  # a field
            cx, cy = rng.uniform(0, width), rng.uniform(sky_bottom, band_top)
            angles = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(4, 7))))
            radii = rng.uniform(15, 50, size=angles.size)
            points = tuple((float(cx + r * np.cos(a)), float(cy + r * np.sin(a))) for a, r in zip(angles, radii))
            regions.append(Region(kind=kind, shape="polygon", points=points, colour=colour))
    return tuple(regions)


def _propose_large(rng: np.random.Generator, *, width: int, sky_bottom: int, band_top: int) -> SceneObject:
    kind = str(_pick(rng, ("house", "tree", "car")))
    if kind == "house":
        w = _int_in(rng, HOUSE_WIDTH)
        h = int(round(w * rng.uniform(0.8, 1.1)))
        colours = (_pick(rng, WALL_COLOURS), _pick(rng, ROOF_COLOURS))
    elif kind == "tree":
        w = _int_in(rng, TREE_CROWN)
        h = int(round(w * rng.uniform(1.3, 1.6)))
        colours = (_pick(rng, CROWN_COLOURS), TRUNK_COLOUR)
    else:
        w = _int_in(rng, CAR_WIDTH)
        h = int(round(w * rng.uniform(0.45, 0.55)))
        colours = (_pick(rng, CAR_COLOURS),)
    lowest_top = sky_bottom - int(LARGE_INTO_SKY * h)
    y2 = int(rng.integers(lowest_top + h, band_top + 1))
    x1 = int(rng.integers(0, width - w + 1))
    return SceneObject(kind=kind, box=(x1, y2 - h, x1 + w, y2), colours=colours)


def _propose_small(rng: np.random.Generator, *, width: int, band_top: int) -> SceneObject:
    kind = str(_pick(rng, ("ball", "kite")))
    if kind == "ball":
        w = h = _int_in(rng, BALL_DIAMETER)
    else:
        w = _int_in(rng, KITE_WIDTH)
        h = int(round(w * 1.4))
    x1 = int(rng.integers(0, width - w + 1))
    y1 = int(rng.integers(0, band_top - h + 1))
    colour = _pick(rng, TOY_COLOURS)
    return SceneObject(kind=kind, box=(x1, y1, x1 + w, y1 + h), colours=(colour,))


def _propose_crowd(rng: np.random.Generator, *, width: int, sky_bottom: int, band_top: int) -> SceneObject:
    """A tight cluster of balls, annotated as one iscrowd region (like COCO's crowds of people)."""
    radius = _int_in(rng, CROWD_RADIUS)
    margin = radius + CROWD_BALL_DIAMETER[1]
    cx = int(rng.integers(margin, width - margin))
    cy = int(rng.integers(sky_bottom + margin, band_top - margin))
    balls = []
    for _ in range(_int_in(rng, CROWD_BALLS)):
        r = _int_in(rng, CROWD_BALL_DIAMETER) // 2
        angle, dist = rng.uniform(0, 2 * np.pi), radius * np.sqrt(rng.uniform())
        balls.append((int(cx + dist * np.cos(angle)), int(cy + dist * np.sin(angle)), r))
    box = (min(x - r for x, _, r in balls), min(y - r for _, y, r in balls),
           max(x + r for x, _, r in balls) + 1, max(y + r for _, y, r in balls) + 1)
    colours = tuple(_pick(rng, TOY_COLOURS) for _ in balls)
    return SceneObject(kind="crowd", box=box, colours=colours, balls=tuple(balls))


def _propose_crate(rng: np.random.Generator, *, width: int, height: int, band_top: int) -> SceneObject:
    w = _int_in(rng, CRATE_SIDE)
    h = int(np.clip(w + rng.integers(-2, 3), CRATE_SIDE[0], CRATE_SIDE[1]))
    x1 = int(rng.integers(2, width - w - 1))
    y1 = int(rng.integers(band_top + KERB_HEIGHT + 2, height - h - 1))
    return SceneObject(kind="crate", box=(x1, y1, x1 + w, y1 + h))


def sample_layout(rng: np.random.Generator, *, width: int, height: int, band_height: int, cue_gap: int,
                  max_overlap: float, crowd_probability: float) -> SceneLayout:
    """A random scene layout of `width` x `height` pixels; independent of the scene type."""
    band_top = height - band_height
    assert band_top - cue_gap >= MIN_SKY_HEIGHT, "SyntheticConfig guarantees room for the sky"
    sky_bottom = int(rng.integers(MIN_SKY_HEIGHT, band_top - cue_gap + 1))
    regions = _sample_regions(rng, width=width, sky_bottom=sky_bottom, band_top=band_top)
    placed: list[SceneObject] = []
    proposals: list[Callable[[], SceneObject]] = []
    proposals += [lambda: _propose_large(rng, width=width, sky_bottom=sky_bottom, band_top=band_top)
                  ] * _int_in(rng, LARGE_PER_IMAGE)
    if rng.uniform() < crowd_probability:
        proposals.append(lambda: _propose_crowd(rng, width=width, sky_bottom=sky_bottom, band_top=band_top))
    proposals += [lambda: _propose_small(rng, width=width, band_top=band_top)] * _int_in(rng, SMALL_PER_IMAGE)
    proposals += [lambda: _propose_crate(rng, width=width, height=height, band_top=band_top)
                  ] * _int_in(rng, CRATES_PER_IMAGE)
    for propose in proposals:
        obj = _place(rng, propose, placed, max_overlap)
        if obj is not None:
            placed.append(obj)
    return SceneLayout(width=width, height=height, sky_bottom=sky_bottom, band_top=band_top, regions=regions,
                       objects=tuple(placed), noise_seed=int(rng.integers(2**31)),
                       landmark_x=int(rng.integers(width // 6, width - width // 6)),
                       clouds=_sample_clouds(rng, width=width, sky_bottom=sky_bottom),
                       stars=tuple((int(rng.integers(width)), int(rng.integers(sky_bottom - 2)),
                                    int(rng.integers(1, 3))) for _ in range(_int_in(rng, STARS_PER_SKY))))


def _sample_clouds(rng: np.random.Generator, *, width: int, sky_bottom: int) -> tuple[tuple[int, int, int, int], ...]:
    clouds = []
    for _ in range(_int_in(rng, CLOUDS_PER_SKY)):
        h = int(rng.integers(8, min(20, sky_bottom // 2) + 1))
        clouds.append((int(rng.integers(width)), int(rng.integers(sky_bottom // 5, int(0.6 * sky_bottom) + 1)),
                       int(rng.integers(30, 61)), h))
    return tuple(clouds)


# ------------------------------------------------------------------ drawing


class Painter:
    """Draws each shape twice: in colour on the image, and as the object's index on a label map.

    The label map (0 = no object) records which object is visible at each pixel,
    so the annotations are exactly the drawn pixels, occlusion included.
    """

    def __init__(self, width: int, height: int) -> None:
        self.image = Image.new("RGB", (width, height))
        self.labels = Image.new("L", (width, height), 0)
        self.draw = ImageDraw.Draw(self.image)
        self.label_draw = ImageDraw.Draw(self.labels)

    def polygon(self, points: list[tuple[float, float]], colour: Colour, index: int) -> None:
        self.draw.polygon(points, fill=colour)
        if index:
            self.label_draw.polygon(points, fill=index)

    def ellipse(self, box: tuple[float, float, float, float], colour: Colour, index: int) -> None:
        self.draw.ellipse(box, fill=colour)
        if index:
            self.label_draw.ellipse(box, fill=index)

    def rectangle(self, box: tuple[float, float, float, float], colour: Colour, index: int) -> None:
        """Fills pixels box[0]..box[2] x box[1]..box[3], both ends included (PIL's rule)."""
        self.draw.rectangle(box, fill=colour)
        if index:
            self.label_draw.rectangle(box, fill=index)


def draw_sky(painter: Painter, *, width: int, sky_bottom: int, scene: str) -> None:
    """The far cue, with `draw_landmark` the only drawing that depends on the scene type."""
    for y, colour in enumerate(sky_colours(scene=scene, sky_bottom=sky_bottom).tolist()):
        painter.draw.line([(0, y), (width - 1, y)], fill=tuple(colour))


def sky_colours(*, scene: str, sky_bottom: int) -> np.ndarray:
    """int (S, 3): the sky colour of each row, tinted towards the horizon."""
    fade = np.arange(sky_bottom)[:, None] / max(sky_bottom - 1, 1)  # (S, 1): 0 at the top, 1 at the horizon
    return np.clip(np.asarray(SKY_COLOURS[scene]) + np.asarray(SKY_HORIZON_TINT) * fade, 0, 255).astype(int)


def draw_landmark(painter: Painter, layout: SceneLayout, scene: str) -> None:
    """The scene type's landmark, inside the sky rows: clouds (day), a setting sun (dusk), a moon
    and stars (night). Drawn on the image only: landmarks are not objects."""
    draw, sky = painter.draw, layout.sky_bottom
    if scene == "day":
        for cx, cy, w, h in layout.clouds:  # a cloud: a wide ellipse under two bumps; bottom < 0.85 sky
            draw.ellipse((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), fill=CLOUD_COLOUR)
            draw.ellipse((cx - w / 3, cy - h, cx, cy), fill=CLOUD_COLOUR)
            draw.ellipse((cx - w / 8, cy - 0.8 * h, cx + w / 4, cy + h / 4), fill=CLOUD_COLOUR)
    elif scene == "dusk":  # the upper half of a big disc resting on the horizon, one row above it
        r = min(sky - 4, 32)
        x, y = layout.landmark_x, sky - 1
        draw.pieslice((x - r, y - r, x + r, y + r), start=180, end=360, fill=SUN_COLOUR)
    else:
        for x, y, size in layout.stars:
            draw.rectangle((x, y, x + size - 1, min(y + size - 1, sky - 1)), fill=STAR_COLOUR)
        r = min(0.3 * sky, 14)
        x, y = layout.landmark_x, 0.45 * sky
        draw.ellipse((x - r, y - r, x + r, y + r), fill=MOON_COLOUR)
        behind = tuple(sky_colours(scene=scene, sky_bottom=sky)[int(y)].tolist())
        draw.ellipse((x - 0.5 * r, y - 1.1 * r, x + 1.4 * r, y + 0.8 * r), fill=behind)  # leaves a crescent


def draw_regions(painter: Painter, regions: tuple[Region, ...]) -> None:
    for region in regions:
        if region.shape == "rect":
            painter.rectangle((*region.points[0], *region.points[1]), region.colour, 0)
        elif region.shape == "ellipse":
            painter.ellipse((*region.points[0], *region.points[1]), region.colour, 0)
        else:
            painter.polygon(list(region.points), region.colour, 0)


def draw_band(painter: Painter, *, width: int, height: int, band_top: int) -> None:
    """The neutral ground of the crates: identical in every scene."""
    painter.rectangle((0, band_top, width - 1, height - 1), BAND_COLOUR, 0)
    painter.rectangle((0, band_top, width - 1, band_top + KERB_HEIGHT - 1), KERB_COLOUR, 0)


def draw_context_object(painter: Painter, box: Box, index: int) -> None:
    """A crate: the same look for every context class; deliberately given no class."""
    x1, y1, x2, y2 = box
    painter.rectangle((x1, y1, x2 - 1, y2 - 1), CRATE_EDGE, index)
    painter.rectangle((x1 + 2, y1 + 2, x2 - 3, y2 - 3), CRATE_FILL, index)
    mid = (y1 + y2) // 2
    painter.draw.line([(x1 + 2, mid), (x2 - 3, mid)], fill=CRATE_EDGE)


def _draw_house(painter: Painter, obj: SceneObject, index: int) -> None:
    x1, y1, x2, y2 = obj.box
    w, h = x2 - x1, y2 - y1
    wall, roof = obj.colours
    eave = y1 + int(0.42 * h)
    inset = int(0.1 * w)
    painter.rectangle((x1 + inset, eave, x2 - 1 - inset, y2 - 1), wall, index)
    painter.polygon([(x1, eave), (x2 - 1, eave), ((x1 + x2 - 1) / 2, y1)], roof, index)
    door_w = max(3, w // 6)
    door_x = x1 + w // 2 - door_w // 2
    painter.draw.rectangle((door_x, y2 - 1 - int(0.3 * h), door_x + door_w - 1, y2 - 1), fill=DARK)


def _draw_tree(painter: Painter, obj: SceneObject, index: int) -> None:
    x1, y1, x2, y2 = obj.box
    w = x2 - x1
    crown, trunk = obj.colours
    trunk_w = max(3, w // 5)
    tx = x1 + w // 2 - trunk_w // 2
    painter.rectangle((tx, y1 + int(0.7 * w), tx + trunk_w - 1, y2 - 1), trunk, index)
    painter.ellipse((x1, y1, x2 - 1, y1 + w - 1), crown, index)


def _draw_car(painter: Painter, obj: SceneObject, index: int) -> None:
    x1, y1, x2, y2 = obj.box
    w, h = x2 - x1, y2 - y1
    (body,) = obj.colours
    r = max(3, int(0.22 * h))
    roof_line = y1 + int(0.4 * h)
    painter.polygon([(x1 + 0.2 * w, roof_line), (x1 + 0.32 * w, y1), (x1 + 0.68 * w, y1),
                     (x1 + 0.8 * w, roof_line)], body, index)
    painter.draw.polygon([(x1 + 0.27 * w, roof_line), (x1 + 0.36 * w, y1 + 0.15 * h), (x1 + 0.64 * w, y1 + 0.15 * h),
                          (x1 + 0.73 * w, roof_line)], fill=WINDOW_COLOUR)
    painter.rectangle((x1, roof_line, x2 - 1, y2 - 1 - r), body, index)
    for cx in (x1 + int(0.22 * w), x1 + int(0.78 * w)):
        painter.ellipse((cx - r, y2 - 2 * r, cx + r - 1, y2 - 1), DARK, index)


def _draw_ball(painter: Painter, obj: SceneObject, index: int) -> None:
    x1, y1, x2, y2 = obj.box
    painter.ellipse((x1, y1, x2 - 1, y2 - 1), obj.colours[0], index)


def _draw_kite(painter: Painter, obj: SceneObject, index: int) -> None:
    x1, y1, x2, y2 = obj.box
    cx, cy = (x1 + x2 - 1) / 2, y1 + 0.4 * (y2 - 1 - y1)
    painter.polygon([(cx, y1), (x2 - 1, cy), (cx, y2 - 1), (x1, cy)], obj.colours[0], index)
    painter.draw.line([(cx, y1), (cx, y2 - 1)], fill=DARK)
    painter.draw.line([(x1, cy), (x2 - 1, cy)], fill=DARK)


def _draw_crowd(painter: Painter, obj: SceneObject, index: int) -> None:
    for (cx, cy, r), colour in zip(obj.balls, obj.colours):
        painter.ellipse((cx - r, cy - r, cx + r, cy + r), colour, index)


_DRAW = {"house": _draw_house, "tree": _draw_tree, "car": _draw_car, "ball": _draw_ball, "kite": _draw_kite,
         "crowd": _draw_crowd}


def render_scene(layout: SceneLayout, scene: str) -> tuple[np.ndarray, np.ndarray]:
    """Draw `layout` under scene type `scene`.

    Returns the image uint8 (H, W, 3) and the label map uint8 (H, W): at each pixel
    1 + the index in `layout.objects` of the object seen there, 0 for none.
    """
    assert len(layout.objects) < 255, "the label map is 8-bit"
    painter = Painter(layout.width, layout.height)
    draw_regions(painter, layout.regions)
    draw_sky(painter, width=layout.width, sky_bottom=layout.sky_bottom, scene=scene)
    draw_landmark(painter, layout, scene)
    draw_band(painter, width=layout.width, height=layout.height, band_top=layout.band_top)
    for i, obj in enumerate(layout.objects):
        if obj.kind == "crate":
            draw_context_object(painter, obj.box, i + 1)
        else:
            _DRAW[obj.kind](painter, obj, i + 1)
    rgb = np.asarray(painter.image, dtype=np.int16)  # (H, W, 3)
    noise = np.random.default_rng(layout.noise_seed).integers(
        -PIXEL_NOISE, PIXEL_NOISE + 1, size=(layout.height, layout.width, 1), dtype=np.int16)  # (H, W, 1)
    image = np.clip(rgb + noise, 0, 255).astype(np.uint8)
    return image, np.asarray(painter.labels, dtype=np.uint8)


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
    return (np.random.default_rng(np.random.SeedSequence([*root, _LAYOUT_STREAM])),
            np.random.default_rng(np.random.SeedSequence([*root, _SCENE_STREAM])))


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
