"""Reading images from disk: any mode PIL reads -> uint8 RGB, EXIF orientation handled.

EXIF orientation and COCO. A camera may store a portrait photo as a landscape
bitmap plus an EXIF tag saying how to turn it upright. COCO's annotations
were drawn in browsers of 2014-2015, which ignored that tag, so COCO's
`width`/`height` and boxes refer to the bitmap as stored. Tools that annotate
in an EXIF-aware viewer produce the opposite. `load_image` therefore decides
per image, given the size the annotations expect:

- the EXIF-transposed size matches the expected size: transpose (this covers
  images with no tag, and tags such as 180 degrees that keep the size);
- only the stored size matches (a 90-degree tag, COCO's case): keep the
  stored layout, so the boxes stay on their objects;
- neither matches: the annotations describe some other image: UserError.

Without an expected size the tag is applied, as any viewer would.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ion.errors import UserError

EXIF_ORIENTATION_TAG = 0x0112
# Orientations 5-8 swap width and height (EXIF 2.3, tag 274).
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def _bomb_error(path: Path, err: Exception) -> UserError:
    """PIL refuses images that declare more than 2 x Image.MAX_IMAGE_PIXELS pixels
    (decompression bombs): decoding one would take gigabytes."""
    return UserError(f"{path}: {err}; replace the file with a photo of a sensible size, or remove the image from "
                     f"the annotations / set data.coco.on_bad_annotation: drop")


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found (restore it, or remove the image from the annotation "
                        f"file / set data.coco.on_bad_annotation: drop)") from None
    except Image.DecompressionBombError as err:
        raise _bomb_error(path, err) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path}: cannot read the image ({err}); replace the file with a readable "
                        f"JPEG/PNG or remove the image from the annotations") from None
    return image


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1..8), 1 when absent or invalid."""
    try:
        value = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except (TypeError, ValueError, SyntaxError, OSError):
        return 1
    return value if 1 <= value <= 8 else 1


def stored_and_oriented_size(path: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """((width, height) as stored, (width, height) after the EXIF tag), reading the header only."""
    try:
        with Image.open(path) as image:
            stored = image.size
            orientation = exif_orientation(image)
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found") from None
    except Image.DecompressionBombError as err:
        raise _bomb_error(path, err) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path}: cannot read the image header ({err}); replace the file") from None
    oriented = (stored[1], stored[0]) if orientation in _SWAPPING_ORIENTATIONS else stored
    return stored, oriented


def apply_exif_for_size(*, path: Path, stored: tuple[int, int], oriented: tuple[int, int],
                        expected: tuple[int, int]) -> bool:
    """Whether to apply the EXIF tag so that the image has the `expected` (width, height).

    The rule of the module docstring; raises UserError when neither layout fits.
    """
    if oriented == expected:
        return True
    if stored == expected:
        return False
    raise UserError(f"{path}: the image is {stored[0]}x{stored[1]} pixels"
                    f"{'' if oriented == stored else f' ({oriented[0]}x{oriented[1]} after its EXIF orientation)'}"
                    f" but its annotation says width={expected[0]}, height={expected[1]} "
                    f"(fix the image entry's width/height or replace the file)")


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 (H, W, 3) RGB."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit greyscale PNG: PIL's convert("RGB") would clip at 255.
        grey = (np.asarray(image, dtype=np.uint16) // 257).astype(np.uint8)  # (H, W)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "I":
        # 32-bit integer pixels: PIL opens some 16-bit greyscale PNGs/TIFFs so. Values above
        # 255 mean a 16-bit range (scaled down); otherwise the values are already 8-bit.
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)  # (H, W)
        grey = (values // 257 if values.max(initial=0) > 255 else values).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels keep whatever colour they store; compose on black so they are defined.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_image(path: Path | str, *, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB.

    Greyscale, palette, CMYK, 16-bit and RGBA/PNG images become RGB.
    `expected_size` = (width, height) the annotations use; it decides whether
    the EXIF orientation is applied (module docstring). Unreadable files raise
    UserError naming the file.
    """
    path = Path(path)
    image = _open(path)
    orientation = exif_orientation(image)
    oriented_size = (image.size[1], image.size[0]) if orientation in _SWAPPING_ORIENTATIONS else image.size
    apply_tag = True
    if expected_size is not None:
        apply_tag = apply_exif_for_size(
            path=path, stored=image.size, oriented=oriented_size, expected=tuple(expected_size))
    if apply_tag and orientation != 1:
        image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def decode_image(data: bytes, *, name: str = "image bytes") -> np.ndarray:
    """`load_image` of a file's bytes (a JPEG/PNG sent over the network): uint8 (H, W, 3)
    RGB, the EXIF tag applied. UserError naming `name` when the bytes are no image."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as err:
        raise UserError(f"{name}: {err}; send a photo of a sensible size") from None
    except UnidentifiedImageError:
        raise UserError(f"{name}: cannot read the image (not a format PIL reads); send the bytes of a JPEG/PNG "
                        "file") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{name}: cannot read the image ({err}); send the bytes of a JPEG/PNG file") from None
    if exif_orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def check_image_headers(chunk: tuple[str, list[tuple[int, str, int, int]]]) -> list[tuple[int, tuple | None]]:
    """A task (picklable, for a worker pool): (image_dir, [(index, file_name, width, height)])
    -> [(index, (reason, message, fix) or None)], the file check of each image."""
    image_dir, files = chunk
    return [(i, _image_file_problem(Path(image_dir) / name, width, height)) for i, name, width, height in files]


def _image_file_problem(path: Path, width: int, height: int) -> tuple[str, str, str] | None:
    """(reason, message, fix) unless the file exists and has the annotated size
    (directly or after its EXIF orientation)."""
    if not path.is_file():
        return "missing_image_file", f"image file {path} not found", "check data.coco.*_images or restore the file"
    try:
        stored, oriented = stored_and_oriented_size(path)
        apply_exif_for_size(path=path, stored=stored, oriented=oriented, expected=(width, height))
    except UserError as err:
        return "bad_image_file", str(err), "replace the file or fix width/height"
    return None
