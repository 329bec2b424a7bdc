"""Selective search (Uijlings et al., IJCV 2013) with OpenCV contrib's ximgproc:
the bottom-up source for datasets without MCG files (the embedded default
uses it in MCG's place; ION itself used it before MCG+RPN, Sec. 4 and
Appendix item 2).

OpenCV's `switchToSelectiveSearchFast` hard-wires the graph segmentation's
minimum segment size to 100 px, which merges 8-16 px objects into the
background (measured on the synthetic data: 72% of small objects found;
min_size 10: all). So the same three settings are built here from the lower-level API,
with k, sigma and min_size exposed:

    fast:    HSV + Lab; k, k + k_step, k + 2 k_step; strategies CFTS and FTS
    quality: HSV, Lab, grey, hue, rgI; k .. k + 4 k_step; CFTS, FTS, F, S
    single:  HSV; k; CFTS
    (C colour, F fill, T texture, S size similarity, combined with equal weights)

Selective search has no scores. OpenCV ranks its boxes pseudo-randomly
(random number x hierarchy level, after the paper), so the score stored is
rank-based: 1 / (rank + 1), rank 0 being OpenCV's first box. The C `rand()`
behind that ranking is seeded per call. It is also the process's one shared
`rand()`: inside a Ray worker other threads draw from it while a search runs,
which reorders the boxes of ~5% of the images from run to run (measured: 28 of
600). `selective_search_isolated` therefore runs the search in a helper
process of its own, with no other threads, so the same image gives the same
boxes in the same order whichever worker runs it.
"""
import atexit
import ctypes
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Literal, Optional

import cv2
import numpy as np

_SEG = cv2.ximgproc.segmentation
_LIBC = ctypes.CDLL(None)


def opencv_xywh_to_xyxy(rects: np.ndarray) -> np.ndarray:
    """OpenCV rects (x, y, w, h), integer pixel indices -> float32 (N, 4) xyxy
    continuous coordinates: the rect covers pixels x .. x + w - 1, i.e. [x, x + w)."""
    rects = np.asarray(rects, dtype=np.float32).reshape(-1, 4)  # (N, 4)
    return np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)


def _colour_spaces(bgr: np.ndarray, mode: str) -> list[np.ndarray]:
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    if mode == "single":
        return [hsv]
    lab = cv2.cvtColor(bgr, cv2.COLOR_BGR2Lab)
    if mode == "fast":
        return [hsv, lab]
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    blue, green, red = cv2.split(bgr)
    # OpenCV's quality mode: the image as (R, G, intensity).
    rg_grey = cv2.merge([red, green, grey])
    return [hsv, lab, grey, hsv[:, :, 0].copy(), rg_grey]


def _strategies(mode: str) -> list:
    def cfts():
        return _SEG.createSelectiveSearchSegmentationStrategyMultiple(
            _SEG.createSelectiveSearchSegmentationStrategyColor(),
            _SEG.createSelectiveSearchSegmentationStrategyFill(),
            _SEG.createSelectiveSearchSegmentationStrategyTexture(),
            _SEG.createSelectiveSearchSegmentationStrategySize())

    def fts():
        return _SEG.createSelectiveSearchSegmentationStrategyMultiple(
            _SEG.createSelectiveSearchSegmentationStrategyFill(),
            _SEG.createSelectiveSearchSegmentationStrategyTexture(),
            _SEG.createSelectiveSearchSegmentationStrategySize())

    if mode == "single":
        return [cfts()]
    if mode == "fast":
        return [cfts(), fts()]
    return [cfts(), fts(), _SEG.createSelectiveSearchSegmentationStrategyFill(),
            _SEG.createSelectiveSearchSegmentationStrategySize()]


def _segmentation_scales(mode: str, k: float, k_step: float) -> list[float]:
    steps = {"single": 1, "fast": 3, "quality": 5}[mode]
    return [k + i * k_step for i in range(steps)]


def selective_search(
    image: np.ndarray,
    *,
    mode: Literal["fast", "quality", "single"] = "fast",
    k: float = 150.0,
    k_step: float = 150.0,
    sigma: float = 0.8,
    min_size: int = 10,
    max_boxes: int = 2000,
    resize_max: Optional[int] = 500,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Selective search boxes of one image.

    image: uint8 (H, W, 3) RGB (ion.data.split.load_image).
    Images whose longer side exceeds `resize_max` are segmented downscaled and
    the boxes mapped back. Returns boxes float32 (N, 4) xyxy in the original
    image, N <= max_boxes, best-ranked first, and scores float32 (N,) = 1 / (rank + 1).
    """
    if mode not in ("fast", "quality", "single"):
        raise ValueError(f"mode must be fast, quality or single, got {mode!r}")
    # One thread: Ray tasks are the parallelism (one image per task).
    cv2.setNumThreads(1)
    H, W = image.shape[:2]
    bgr = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
    if resize_max is not None and max(H, W) > resize_max:
        scale = resize_max / max(H, W)
        size = (max(1, round(W * scale)), max(1, round(H * scale)))  # cv2 wants (w, h)
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)

    search = _SEG.createSelectiveSearchSegmentation()
    search.setBaseImage(bgr)
    search.clearImages()
    search.clearGraphSegmentations()
    search.clearStrategies()
    for converted in _colour_spaces(bgr, mode):
        search.addImage(converted)
    for scale_k in _segmentation_scales(mode, k, k_step):
        search.addGraphSegmentation(
            _SEG.createGraphSegmentation(sigma=sigma, k=float(scale_k), min_size=min_size))
    for strategy in _strategies(mode):
        search.addStrategy(strategy)
    _LIBC.srand(ctypes.c_uint(seed))
    rects = search.process()[:max_boxes]  # (N, 4) x, y, w, h, OpenCV's rank order

    boxes = opencv_xywh_to_xyxy(rects)  # (N, 4) in the segmented image
    small_h, small_w = bgr.shape[:2]
    boxes[:, 0::2] *= W / small_w
    boxes[:, 1::2] *= H / small_h
    np.clip(boxes[:, 0::2], 0.0, float(W), out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0.0, float(H), out=boxes[:, 1::2])
    scores = 1.0 / (np.arange(len(boxes), dtype=np.float32) + 1.0)
    return boxes, scores


_HELPER: Optional[ProcessPoolExecutor] = None


def selective_search_isolated(image: np.ndarray, **settings) -> tuple[np.ndarray, np.ndarray]:
    """`selective_search(image, **settings)` in this process's helper process.

    The helper is started on first use (spawned: a fresh interpreter, not a
    fork of a multi-threaded worker) and kept for the process's lifetime, so
    a Ray worker pays its ~1 s start once, not once per image.
    """
    global _HELPER
    if _HELPER is None:
        _HELPER = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        atexit.register(_HELPER.shutdown, wait=False, cancel_futures=True)
    return _HELPER.submit(selective_search, image, **settings).result()
