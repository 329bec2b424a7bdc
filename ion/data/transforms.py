"""Image preparation: resize (Fast R-CNN's single scale), normalise, flip.

Images come in as numpy uint8 (H, W, 3) RGB (`ion.data.split.load_image`) and
leave as Tensor[1, 3, H', W'] normalised for the backbone. Boxes scale with
the same factor as the image (one factor for both axes, as Fast R-CNN does).
"""
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ion.ops.box_ops import flip_boxes_xyxy


def resize_scale(*, height: int, width: int, min_size: int, max_size: int) -> float:
    """The factor that makes the shorter side `min_size` without the longer
    side passing `max_size` (Fast R-CNN's test scale)."""
    short, long = min(height, width), max(height, width)
    scale = min_size / short
    if round(long * scale) > max_size:
        scale = max_size / long
    return scale


def resize_image(image: np.ndarray, *, scale: float) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (round(H*scale), round(W*scale), 3), bilinear (as Fast R-CNN)."""
    H, W = image.shape[:2]
    size = (max(1, round(W * scale)), max(1, round(H * scale)))  # cv2 wants (width, height)
    if size == (W, H):
        return image
    import cv2  # here, not at the top: the tensor-level detector (bench/gpu.py) runs without OpenCV

    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)


def resize_masks(masks: np.ndarray, *, height: int, width: int) -> np.ndarray:
    """Instance masks (G, H, W) bool/uint8 -> bool (G, height, width), nearest neighbour."""
    import cv2  # here, as in resize_image

    out = np.zeros((masks.shape[0], height, width), dtype=bool)
    for g, mask in enumerate(masks):
        out[g] = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    return out


def hflip_image(image: np.ndarray) -> np.ndarray:
    """Mirror (H, W, ...) left-right."""
    return np.ascontiguousarray(image[:, ::-1])


def hflip_masks(masks: np.ndarray) -> np.ndarray:
    """Mirror (G, H, W) left-right."""
    return np.ascontiguousarray(masks[:, :, ::-1])


def normalize_image(image: np.ndarray, *, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (H, W, 3) RGB -> float Tensor[1, 3, H, W]: (pixel / 255 - mean) / std."""
    # np.array copies: cached or decoded images may be read-only, which torch.from_numpy warns about.
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0  # (3, H, W)
    mean_t = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return ((x - mean_t) / std_t)[None]  # (1, 3, H, W)


class Prepared(NamedTuple):
    """One image ready for the model: image Tensor[1, 3, H', W'], boxes Tensor[N, 4]
    in the resized (and flipped) image, masks bool (G, H', W') or None, and the
    resize factor (resized = original * scale)."""

    image: Tensor
    boxes: Tensor
    masks: np.ndarray | None
    scale: float


def prepare(image: np.ndarray, boxes: np.ndarray, *, min_size: int, max_size: int, mean: tuple[float, ...],
            std: tuple[float, ...], flip: bool = False, masks: np.ndarray | None = None) -> Prepared:
    """Resize, optionally mirror, and normalise an image with its boxes (and masks).

    image: uint8 (H, W, 3); boxes: float (N, 4) original coordinates (proposals
    or ground truth; call once per set or stack them); masks: (G, H, W) or None.
    """
    H, W = image.shape[:2]
    scale = resize_scale(height=H, width=W, min_size=min_size, max_size=max_size)
    resized = resize_image(image, scale=scale)
    h, w = resized.shape[:2]
    boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4) * scale
    if masks is not None:
        masks = resize_masks(masks, height=h, width=w)
    if flip:
        resized = hflip_image(resized)
        boxes_t = flip_boxes_xyxy(boxes_t, width=float(w))
        if masks is not None:
            masks = hflip_masks(masks)
    return Prepared(image=normalize_image(resized, mean=mean, std=std), boxes=boxes_t, masks=masks, scale=scale)
