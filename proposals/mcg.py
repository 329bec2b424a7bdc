"""MCG import: precomputed Multiscale Combinatorial Grouping boxes (Appendix
item 2), as distributed for COCO (MCG-COCO-<split>-boxes: one .mat file per
image, named after the image, e.g. COCO_val2014_000000000042.mat).

A file holds `boxes` (N x 4) and `scores` (N x 1), or `bboxes` and
`bboxes_scores` as MCG's im2mcg names them — at the top level or inside a
`candidates` struct. Boxes are [y1, x1, y2, x2], 1-based inclusive pixel
indices (MATLAB). Both MATLAB v5 files (scipy.io) and v7.3 files (HDF5 with
a 512-byte user block; MATLAB writes arrays column-major, so an N x 4 matrix
is stored as an HDF5 dataset of shape (4, N)) are read.

File lookup for an image, in order:
  1. `<stem>.mat`, stem = the image's file name without extension
     (COCO_val2014_000000000042.jpg -> COCO_val2014_000000000042.mat);
  2. any .mat file whose name ends in the image id as digits, zero-padded or
     not (COCO_val2014_000000000042.mat, 000000000042.mat, 42.mat), so COCO
     2017 images (000000000042.jpg) find the 2014 MCG files.
The directory is searched recursively once.
"""
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import h5py
import numpy as np
import scipy.io
import torch
from scipy.io.matlab import MatReadError

from ion.errors import UserError
from ion.ops.box_ops import clip_boxes_xyxy, remove_small
from proposals.mix import first_unique, top_k_by_score

# (boxes field, scores field) pairs, in the order they are looked for.
FIELD_PAIRS = (("boxes", "scores"), ("bboxes", "bboxes_scores"))
STRUCT = "candidates"
# MCG keeps a few thousand boxes an image; 50 million values (400 MB as float64)
# can only be a wrong or damaged file, refused before it is read into memory.
MAX_VALUES = 50_000_000
_TRAILING_DIGITS = re.compile(r"(\d+)$")
_SHOW_MISSING = 10


def mcg_yxyx1_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """MCG [y1, x1, y2, x2] 1-based inclusive pixel indices -> float32 (N, 4)
    [x1 - 1, y1 - 1, x2, y2] continuous 0-based coordinates (the project's
    convention): pixel i (1-based) spans [i - 1, i)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)  # (N, 4)
    y1, x1, y2, x2 = boxes.T
    return np.stack([x1 - 1.0, y1 - 1.0, x2, y2], axis=1).astype(np.float32)


def _unreadable(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}; expected MCG fields {' / '.join(f'{b}+{s}' for b, s in FIELD_PAIRS)} "
                     f"(N x 4 boxes [y1, x1, y2, x2], N scores), at the top level or in a "
                     f"'{STRUCT}' struct; replace the file or set proposals.mcg.dir to the MCG box files")


def _v73_array(path: Path, name: str, dataset: object) -> np.ndarray:
    """A MATLAB v7.3 numeric array as numpy, undoing MATLAB's column-major layout;
    UserError for a group, a non-numeric or an implausibly large array."""
    if not isinstance(dataset, h5py.Dataset):
        raise _unreadable(path, f"'{name}' is a {type(dataset).__name__}, not a numeric array")
    if dataset.attrs.get("MATLAB_empty", 0):
        # MATLAB stores an empty array as its dimensions, with this marker.
        return np.zeros((0, 4))
    if dataset.dtype.kind not in "iuf":
        raise _unreadable(path, f"'{name}' holds {dataset.dtype}, not numbers")
    _check_size(path, name, dataset.size)
    return np.asarray(dataset[()], dtype=np.float64).T  # HDF5 (4, N) -> MATLAB (N, 4)


def _check_size(path: Path, name: str, size: int) -> None:
    if size > MAX_VALUES:
        raise _unreadable(path, f"'{name}' holds {size} values, more than the {MAX_VALUES} of any MCG file "
                                "(at most a few thousand boxes an image)")


def _read_v73(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with h5py.File(path, "r") as f:
            groups = [f] + ([f[STRUCT]] if STRUCT in f and isinstance(f[STRUCT], h5py.Group) else [])
            for group in groups:
                for boxes_key, scores_key in FIELD_PAIRS:
                    if boxes_key in group and scores_key in group:
                        return (_v73_array(path, boxes_key, group[boxes_key]),
                                _v73_array(path, scores_key, group[scores_key]).reshape(-1))
            found = sorted(f.keys())
    except (OSError, KeyError, ValueError, RuntimeError) as err:  # h5py's errors for a damaged file
        raise _unreadable(path, f"damaged MATLAB v7.3 (HDF5) file ({err})") from None
    raise _unreadable(path, f"MATLAB v7.3 file with fields {found}")


def _read_v5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        mat = scipy.io.loadmat(path)
    except (ValueError, TypeError, OSError, NotImplementedError, EOFError, MatReadError) as err:
        raise _unreadable(path, f"not a readable MATLAB file ({err})") from None
    scopes = [mat]
    if STRUCT in mat and mat[STRUCT].dtype.names:
        struct = mat[STRUCT][0, 0]  # a 1 x 1 MATLAB struct
        scopes.append({name: struct[name] for name in mat[STRUCT].dtype.names})
    for scope in scopes:
        for boxes_key, scores_key in FIELD_PAIRS:
            if boxes_key in scope and scores_key in scope:
                for key in (boxes_key, scores_key):
                    if scope[key].dtype.kind not in "iuf":
                        raise _unreadable(path, f"'{key}' holds {scope[key].dtype}, not numbers")
                    _check_size(path, key, scope[key].size)
                boxes = np.asarray(scope[boxes_key], dtype=np.float64)
                scores = np.asarray(scope[scores_key], dtype=np.float64).reshape(-1)
                return (boxes.reshape(0, 4) if boxes.size == 0 else boxes), scores
    raise _unreadable(path, f"MATLAB file with fields {sorted(k for k in mat if not k.startswith('__'))}")


def read_mcg_mat(path: Union[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    """Raw MCG boxes float64 (N, 4) [y1, x1, y2, x2] 1-based and scores float64 (N,)
    from a MATLAB v5 or v7.3 .mat file."""
    path = Path(path)
    boxes, scores = _read_v73(path) if h5py.is_hdf5(path) else _read_v5(path)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise _unreadable(path, f"boxes of shape {boxes.shape}")
    if len(scores) != len(boxes):
        raise _unreadable(path, f"{len(boxes)} boxes but {len(scores)} scores")
    for name, values in (("boxes", boxes), ("scores", scores)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise _unreadable(path, f"{bad} NaN or infinite value(s) in the {name}")
    return boxes, scores


def clean_boxes(
    boxes: np.ndarray, scores: np.ndarray, *, width: int, height: int, min_size: float, top_n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Clip xyxy boxes to the image, drop boxes narrower or shorter than
    `min_size`, sort by score (best first), drop exact duplicates (keeping
    the best-scored) and keep `top_n`.
    boxes: float32 (N, 4) xyxy; scores (N,). Returns float32 (M, 4), float32 (M,)."""
    clipped = clip_boxes_xyxy(torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),
                              height=float(height), width=float(width))  # (N, 4)
    big = remove_small(clipped, min_size=min_size).numpy()
    boxes = clipped.numpy()[big]
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)[big]
    order = top_k_by_score(scores, len(scores))
    boxes, scores = boxes[order], scores[order]
    unique = first_unique(boxes)[:top_n]
    return boxes[unique], scores[unique]


def load_mcg_proposals(
    path: Union[str, Path], *, width: int, height: int, min_size: float = 2.0, top_n: int = 2000
) -> tuple[np.ndarray, np.ndarray]:
    """One image's MCG proposals: float32 (M, 4) xyxy in the image, float32 (M,) scores, best first."""
    raw_boxes, raw_scores = read_mcg_mat(path)
    return clean_boxes(mcg_yxyx1_to_xyxy(raw_boxes), raw_scores,
                       width=width, height=height, min_size=min_size, top_n=top_n)


@dataclass(frozen=True)
class McgFiles:
    """Where each image's MCG file is; `missing` lists the images without one."""

    paths: dict[int, Optional[Path]]
    missing: tuple[int, ...]


@dataclass(frozen=True)
class McgIndex:
    """The .mat files of an MCG directory: by stem (every file with that stem, a
    duplicate stem in two subfolders lists both) and by trailing image id."""

    directory: Path
    by_stem: dict[str, list[str]]  # paths as str: an index of COCO's 120k files is built on every `status`
    by_id: dict[int, list[str]]

    def candidate_paths(self, image_id: int, file_name: str) -> list[str]:
        """The files that could be image `image_id`'s (lookup in the module doc): [] none, one, or
        several (ambiguous: the caller names them)."""
        stem = os.path.splitext(os.path.basename(file_name))[0]
        return list(self.by_stem.get(stem) or self.by_id.get(int(image_id), []))

    def candidates(self, image_id: int, file_name: str) -> list[Path]:
        return [Path(p) for p in self.candidate_paths(image_id, file_name)]


def index_mcg_directory(directory: Union[str, Path]) -> McgIndex:
    """Every .mat file under `directory`, searched recursively; symlinked subfolders
    are followed (a split's files are often linked in), each real folder once."""
    directory = Path(directory)
    by_stem: dict[str, list[str]] = {}
    by_id: dict[int, list[str]] = {}
    seen: set[str] = set()
    for root, dirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or the same folder linked twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        prefix = os.path.join(root, "")
        for name in sorted(files):
            if not name.endswith(".mat"):
                continue
            path = prefix + name
            stem = name[: -len(".mat")]
            by_stem.setdefault(stem, []).append(path)
            digits = _TRAILING_DIGITS.search(stem)
            if digits:
                by_id.setdefault(int(digits.group(1)), []).append(path)
    return McgIndex(directory=directory, by_stem=by_stem, by_id=by_id)


def locate_mcg_files(
    directory: Union[str, Path], images: Sequence[tuple[int, str]], *, allow_missing: bool = False
) -> McgFiles:
    """Find the MCG file of each (image_id, file name or path) (lookup in the
    module doc). Missing files raise a UserError listing how many and the
    first ten, unless `allow_missing` (then their path is None); two files that
    could both be an image's (the same stem in two subfolders, or two names
    ending in its id) are a UserError naming them."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"proposals.mcg.dir: {directory} is not a directory; point it at the unpacked "
                        f"MCG-COCO-<split>-boxes files or set it to null to go without MCG")
    index = index_mcg_directory(directory)
    paths: dict[int, Optional[Path]] = {}
    missing: list[tuple[int, str]] = []
    for image_id, file_name in images:
        image_id = int(image_id)
        candidates = index.candidates(image_id, file_name)
        if len(candidates) > 1:
            listed = ", ".join(str(p) for p in sorted(candidates)[:5])
            raise UserError(f"{directory}: several MCG files match image {image_id} "
                            f"({Path(file_name).name}): {listed}; keep one split's files per "
                            f"directory or name the files after the images")
        found = candidates[0] if candidates else None
        if found is None:
            missing.append((image_id, Path(file_name).name))
        paths[image_id] = found
    if missing and not allow_missing:
        shown = ", ".join(f"{image_id} ({name})" for image_id, name in missing[:_SHOW_MISSING])
        more = f" and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
        raise UserError(
            f"proposals.mcg.dir: {directory}: no MCG .mat file for {len(missing)} of {len(paths)} images: "
            f"{shown}{more}; expected <image file stem>.mat or a name ending in the image id "
            f"(e.g. COCO_val2014_{missing[0][0]:012d}.mat); add the files, or set "
            f"proposals.mcg.allow_missing: true to give those images no MCG boxes")
    return McgFiles(paths=paths, missing=tuple(image_id for image_id, _ in missing))
