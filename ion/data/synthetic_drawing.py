"""Drawing a context-shapes layout: the sky, its landmark, the ground regions,
the objects, and a per-pixel label map for the segmentation masks."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ion.data.synthetic_layout import (
    BAND_COLOUR,
    CLOUD_COLOUR,
    CRATE_EDGE,
    CRATE_FILL,
    DARK,
    KERB_COLOUR,
    KERB_HEIGHT,
    MOON_COLOUR,
    PIXEL_NOISE,
    SKY_COLOURS,
    SKY_HORIZON_TINT,
    STAR_COLOUR,
    SUN_COLOUR,
    WINDOW_COLOUR,
    Box,
    Colour,
    Region,
    SceneLayout,
    SceneObject,
)

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
