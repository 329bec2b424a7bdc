"""The context-shapes scenes as layouts: categories, sizes, colours, and the
random placement of regions and objects (ion/data/synthetic.py explains the
data set). Pure numpy; nothing is drawn here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

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
LAYOUT_STREAM, SCENE_STREAM = 0, 1
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
