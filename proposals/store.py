"""The HDF5 proposal store: one file per split and source, ragged layout.

    boxes      float32 (total, 4)   xyxy, 0-based continuous pixels of the original image
    scores     float32 (total,)
    sources    int8    (total,)     optional: index into attrs["source_names"] (mixed sets)
    offsets    int64   (num_images + 1,)   image i owns rows offsets[i]:offsets[i+1]
    image_ids  int64   (num_images,)

Datasets are chunked, gzip-compressed (shuffle filter first) and carry
HDF5's per-chunk Fletcher-32 checksum, so a corrupted chunk fails the read
that touches it. The file also records a sha256 over every dataset
(`verify=True` recomputes it), the counts, the format version and the
coordinate convention. Files are written atomically (ion/atomic.py) and renamed when
complete, so a killed writer never leaves a file that looks finished.

Per-image work that may be killed (selective search, MCG import, RPN
generation) saves finished images in small atomic shard files through
`ShardedWriter`; `assemble` turns the finished shards into a store.
"""
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, Optional, Sequence, Union

import h5py
import numpy as np

from ion.atomic import atomic_path
from ion.errors import UserError

FORMAT = "ion-proposals"
FORMAT_VERSION = 1
COORDINATES = "xyxy, 0-based continuous pixels"
REBUILD = "python -m pipeline run --stages proposals --force"

# Chunks of 1024 boxes (16 KiB): a random read of one image's 1000-3000 boxes
# decompresses little beyond its own rows; 4096-row chunks read half as fast.
# gzip level 1 + shuffle: 10-20% smaller than lzf and 20-50% smaller than raw
# (more on MCG's integer boxes), readable by any HDF5 tool, level 4 hardly
# smaller but slower to write. bench/proposal_store.py measures the costs.
CHUNK_ROWS = 1024
COMPRESSION = "gzip"
COMPRESSION_LEVEL = 1
_FLUSH_ROWS = 1 << 16

# Attributes the writer owns; callers may not set them.
_RESERVED = ("format", "format_version", "coordinates", "num_images", "num_boxes", "checksum",
             "boxes_per_image_min", "boxes_per_image_max", "boxes_per_image_mean", "json_attrs")

Item = tuple  # (image_id, boxes float32 (N, 4), scores float32 (N,)[, sources int8 (N,)])


def _rebuild_error(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}; delete it and rebuild the proposals with `{REBUILD}`")


def _as_item(item: Sequence) -> tuple[int, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Validate and normalise one (image_id, boxes, scores[, sources]) item."""
    if len(item) not in (3, 4):
        raise ValueError(f"a store item is (image_id, boxes, scores[, sources]), got {len(item)} fields")
    image_id = int(item[0])
    boxes = np.asarray(item[1], dtype=np.float32).reshape(-1, 4)  # (N, 4)
    scores = np.asarray(item[2], dtype=np.float32).reshape(-1)  # (N,)
    sources = None if len(item) == 3 else np.asarray(item[3], dtype=np.int8).reshape(-1)
    if len(scores) != len(boxes) or (sources is not None and len(sources) != len(boxes)):
        raise ValueError(f"image {image_id}: {len(boxes)} boxes but {len(scores)} scores"
                         + ("" if sources is None else f" and {len(sources)} sources"))
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise ValueError(f"image {image_id}: non-finite boxes or scores")
    return image_id, boxes, scores, sources


class _Checksum:
    """sha256 over each dataset's bytes, in row order, combined in a fixed order."""

    NAMES = ("boxes", "scores", "sources", "offsets", "image_ids")

    def __init__(self) -> None:
        self._parts = {name: hashlib.sha256() for name in self.NAMES}

    def update(self, name: str, array: np.ndarray) -> None:
        self._parts[name].update(np.ascontiguousarray(array).tobytes())

    def hexdigest(self) -> str:
        combined = hashlib.sha256()
        for name in self.NAMES:
            combined.update(self._parts[name].digest())
        return "sha256:" + combined.hexdigest()


def _create_ragged(f: h5py.File, name: str, dtype, width: Optional[int],
                   compression: Optional[str]) -> h5py.Dataset:
    shape, maxshape, chunks = ((0, width), (None, width), (CHUNK_ROWS, width)) if width else \
        ((0,), (None,), (CHUNK_ROWS * 4,))
    return f.create_dataset(name, shape=shape, maxshape=maxshape, dtype=dtype, chunks=chunks,
                            compression=compression,
                            compression_opts=COMPRESSION_LEVEL if compression == "gzip" else None,
                            shuffle=compression is not None, fletcher32=True)


def _append(dataset: h5py.Dataset, block: np.ndarray) -> None:
    start = dataset.shape[0]
    dataset.resize(start + len(block), axis=0)
    dataset[start:] = block


def _encode_attrs(f: h5py.File, attrs: dict) -> None:
    """Scalars as native HDF5 attributes (h5dump shows them); lists and dicts as JSON."""
    clash = sorted(set(attrs) & set(_RESERVED))
    if clash:
        raise ValueError(f"store attributes {clash} are set by the writer")
    json_keys = []
    for key, value in attrs.items():
        if isinstance(value, (bool, int, float, str, np.integer, np.floating)):
            f.attrs[key] = value
        else:
            f.attrs[key] = json.dumps(value)
            json_keys.append(key)
    f.attrs["json_attrs"] = json.dumps(json_keys)


def write_store(path: Union[str, Path], items: Iterable[Item], attrs: dict, *,
                compression: Optional[Literal["gzip", "lzf"]] = COMPRESSION) -> Path:
    """Write `items` — (image_id, boxes float32 (N, 4) xyxy, scores float32 (N,)
    [, sources int8 (N,)]) in the order they should be stored — to the store at
    `path`, atomically. `attrs` (e.g. source, config_key, source_names) are
    stored beside the counts and checksum. Items stream through; only the
    per-image offsets are held in memory. `compression` None writes
    uncompressed chunks (bench/proposal_store.py compares)."""
    path = Path(path)
    checksum = _Checksum()
    image_ids: list[int] = []
    counts: list[int] = []
    seen: set[int] = set()
    has_sources: Optional[bool] = None
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            boxes_ds = _create_ragged(f, "boxes", np.float32, 4, compression)
            scores_ds = _create_ragged(f, "scores", np.float32, None, compression)
            sources_ds = None
            pending: list[tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]] = []
            pending_rows = 0

            def flush() -> None:
                nonlocal pending, pending_rows
                if not pending:
                    return
                boxes = np.concatenate([p[0] for p in pending])  # (rows, 4)
                scores = np.concatenate([p[1] for p in pending])  # (rows,)
                _append(boxes_ds, boxes)
                _append(scores_ds, scores)
                checksum.update("boxes", boxes)
                checksum.update("scores", scores)
                if sources_ds is not None:
                    sources = np.concatenate([p[2] for p in pending])
                    _append(sources_ds, sources)
                    checksum.update("sources", sources)
                pending, pending_rows = [], 0

            for raw in items:
                image_id, boxes, scores, sources = _as_item(raw)
                if image_id in seen:
                    raise ValueError(f"image {image_id} appears twice in the items for {path}")
                seen.add(image_id)
                if has_sources is None:
                    has_sources = sources is not None
                    if has_sources:
                        sources_ds = _create_ragged(f, "sources", np.int8, None, compression)
                elif has_sources != (sources is not None):
                    raise ValueError(f"image {image_id}: either every item has sources or none has")
                image_ids.append(image_id)
                counts.append(len(boxes))
                pending.append((boxes, scores, sources))
                pending_rows += len(boxes)
                if pending_rows >= _FLUSH_ROWS:
                    flush()
            flush()

            offsets = np.zeros(len(counts) + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
            ids = np.asarray(image_ids, dtype=np.int64)
            f.create_dataset("offsets", data=offsets, fletcher32=True, chunks=True)
            f.create_dataset("image_ids", data=ids, fletcher32=True, chunks=True)
            checksum.update("offsets", offsets)
            checksum.update("image_ids", ids)

            _encode_attrs(f, attrs)
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["coordinates"] = COORDINATES
            f.attrs["num_images"] = len(counts)
            f.attrs["num_boxes"] = int(offsets[-1])
            f.attrs["boxes_per_image_min"] = int(min(counts, default=0))
            f.attrs["boxes_per_image_max"] = int(max(counts, default=0))
            f.attrs["boxes_per_image_mean"] = float(np.mean(counts)) if counts else 0.0
            f.attrs["checksum"] = checksum.hexdigest()
    return path


class ProposalStore:
    """Read access to one store file. Opening checks the format, the version and
    that the counts agree with the datasets; `verify=True` also recomputes the
    sha256 over all data (reads the whole file). A file that fails a check — or
    a chunk that fails its Fletcher-32 checksum on read — raises UserError
    naming the file and the rebuild command.

        with ProposalStore(path) as store:
            boxes, scores = store.get(image_id)   # float32 (N, 4) xyxy, float32 (N,)
    """

    def __init__(self, path: Union[str, Path], *, verify: bool = False) -> None:
        self.path = Path(path)
        self._file = self._open()
        try:
            self._check_structure()
            if verify:
                self.verify()
        except BaseException:
            self._file.close()
            raise

    def _open(self) -> h5py.File:
        if not self.path.is_file():
            raise UserError(f"{self.path}: proposal store is missing; build it with `{REBUILD}`")
        if not h5py.is_hdf5(self.path):
            raise _rebuild_error(self.path, "not an HDF5 file (truncated, or not a proposal store)")
        try:
            return h5py.File(self.path, "r")
        except OSError as err:
            raise _rebuild_error(self.path, f"cannot be opened ({err}): the file is truncated or damaged") \
                from None

    def _check_structure(self) -> None:
        f, path = self._file, self.path
        if f.attrs.get("format") != FORMAT:
            raise _rebuild_error(path, f"not a proposal store (attribute format is "
                                       f"{f.attrs.get('format')!r}, expected {FORMAT!r})")
        version = int(f.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise _rebuild_error(path, f"store format version {version}, this code reads {FORMAT_VERSION}")
        missing = [name for name in ("boxes", "scores", "offsets", "image_ids") if name not in f]
        if missing:
            raise _rebuild_error(path, f"datasets {missing} are missing")
        try:
            self.image_ids = f["image_ids"][:].astype(np.int64)  # (num_images,)
            self._offsets = f["offsets"][:].astype(np.int64)  # (num_images + 1,)
        except OSError as err:
            raise _rebuild_error(path, f"cannot read the image index ({err})") from None
        num_images, num_boxes = int(f.attrs.get("num_images", -1)), int(f.attrs.get("num_boxes", -1))
        total = f["boxes"].shape[0]
        problems = []
        if len(self.image_ids) != num_images or len(self._offsets) != num_images + 1:
            problems.append(f"{len(self.image_ids)} image ids and {len(self._offsets)} offsets "
                            f"for num_images {num_images}")
        if f["boxes"].shape[1:] != (4,) or f["scores"].shape != (total,) or total != num_boxes:
            problems.append(f"boxes {f['boxes'].shape} and scores {f['scores'].shape} "
                            f"for num_boxes {num_boxes}")
        if "sources" in f and f["sources"].shape != (total,):
            problems.append(f"sources {f['sources'].shape} for num_boxes {num_boxes}")
        if len(self._offsets) and (self._offsets[0] != 0 or self._offsets[-1] != total
                                   or np.any(np.diff(self._offsets) < 0)):
            problems.append("offsets do not run from 0 to the number of boxes")
        if problems:
            raise _rebuild_error(path, "inconsistent counts: " + "; ".join(problems))
        self._row = {int(image_id): i for i, image_id in enumerate(self.image_ids)}
        self._datasets = {name: f[name] for name in ("boxes", "scores", "sources") if name in f}
        if len(self._row) != len(self.image_ids):
            raise _rebuild_error(path, "an image id appears twice")

    def verify(self) -> None:
        """Recompute the sha256 over all datasets and compare with the stored one."""
        f = self._file
        checksum = _Checksum()
        try:
            for name in ("boxes", "scores", "sources"):
                if name not in f:
                    continue
                dataset = f[name]
                step = CHUNK_ROWS * 64
                for start in range(0, dataset.shape[0], step):
                    checksum.update(name, dataset[start:start + step])
        except OSError as err:
            raise _rebuild_error(self.path, f"data cannot be read ({err})") from None
        checksum.update("offsets", self._offsets)
        checksum.update("image_ids", self.image_ids)
        if checksum.hexdigest() != f.attrs.get("checksum"):
            raise _rebuild_error(self.path, "checksum mismatch: the data were changed or damaged after writing")

    @property
    def attrs(self) -> dict:
        """All file attributes, JSON-encoded ones decoded."""
        raw = dict(self._file.attrs)
        json_keys = json.loads(raw.pop("json_attrs", "[]"))
        out = {}
        for key, value in raw.items():
            if isinstance(value, bytes):
                value = value.decode()
            elif isinstance(value, np.generic):
                value = value.item()
            out[key] = json.loads(value) if key in json_keys else value
        return out

    @property
    def source_names(self) -> tuple[str, ...]:
        """Names of the sources indexed by `get_sources` (mixed sets), else ()."""
        return tuple(self.attrs.get("source_names", ()))

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: int) -> bool:
        return int(image_id) in self._row

    def _rows(self, image_id: int) -> slice:
        try:
            i = self._row[int(image_id)]
        except KeyError:
            raise KeyError(f"{self.path}: no proposals for image {image_id}") from None
        return slice(int(self._offsets[i]), int(self._offsets[i + 1]))

    def _read(self, name: str, rows: slice) -> np.ndarray:
        try:
            return self._datasets[name][rows]
        except OSError as err:
            raise _rebuild_error(self.path, f"dataset {name} rows {rows.start}:{rows.stop} cannot be "
                                            f"read ({err})") from None

    def get(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(boxes float32 (N, 4) xyxy, scores float32 (N,)) of one image; reads only its rows."""
        rows = self._rows(image_id)
        return self._read("boxes", rows), self._read("scores", rows)

    def get_sources(self, image_id: int) -> np.ndarray:
        """int8 (N,): for each box of `image_id`, its index into `source_names`."""
        if "sources" not in self._datasets:
            raise KeyError(f"{self.path}: this store has no per-box sources")
        return self._read("sources", self._rows(image_id))

    def num_boxes(self, image_id: int) -> int:
        rows = self._rows(image_id)
        return rows.stop - rows.start

    def iter_items(self, images_per_read: int = 256, *, with_sources: bool = False) -> Iterator[tuple]:
        """(image_id, boxes, scores[, sources]) for every image in stored order,
        reading `images_per_read` images per HDF5 read (a whole-file scan)."""
        if with_sources and "sources" not in self._datasets:
            raise KeyError(f"{self.path}: this store has no per-box sources")
        for first in range(0, len(self), images_per_read):
            last = min(first + images_per_read, len(self))
            block = slice(int(self._offsets[first]), int(self._offsets[last]))
            columns = [self._read("boxes", block), self._read("scores", block)]
            if with_sources:
                columns.append(self._read("sources", block))
            for i in range(first, last):
                a, b = self._offsets[i] - block.start, self._offsets[i + 1] - block.start
                yield (int(self.image_ids[i]),) + tuple(column[a:b] for column in columns)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ProposalStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):
        # An open HDF5 handle cannot be pickled: a copy sent to a Ray task reopens the file.
        return (ProposalStore, (self.path,))


# ---------------------------------------------------------------- resumable per-image work


@dataclass(frozen=True)
class Shard:
    """A fixed group of images whose proposals are saved together in one file."""

    index: int
    image_ids: tuple[int, ...]

    @property
    def file_name(self) -> str:
        # The ids' digest in the name: a shard file from a different image list
        # is never mistaken for this one.
        digest = hashlib.sha1(np.asarray(self.image_ids, dtype=np.int64).tobytes()).hexdigest()[:12]
        return f"shard-{self.index:06d}-{digest}.npz"


def write_shard(directory: Union[str, Path], shard: Shard, items: Iterable[Item]) -> Path:
    """Save the items of `shard` (its images, in its order) atomically as
    `<directory>/<shard.file_name>`. Safe to call from a Ray task on a
    machine that sees `directory`."""
    directory = Path(directory)
    normalised = [_as_item(item) for item in items]
    ids = tuple(item[0] for item in normalised)
    if ids != shard.image_ids:
        raise ValueError(f"shard {shard.index}: items are for images {ids[:5]}..., "
                         f"expected {shard.image_ids[:5]}...")
    has_sources = {item[3] is not None for item in normalised}
    if len(has_sources) > 1:
        raise ValueError(f"shard {shard.index}: either every item has sources or none has")
    arrays = {
        "image_ids": np.asarray(ids, dtype=np.int64),
        "counts": np.asarray([len(item[1]) for item in normalised], dtype=np.int64),
        "boxes": np.concatenate([item[1] for item in normalised] or [np.zeros((0, 4), np.float32)]),
        "scores": np.concatenate([item[2] for item in normalised] or [np.zeros(0, np.float32)]),
    }
    if has_sources == {True}:
        arrays["sources"] = np.concatenate([item[3] for item in normalised])
    path = directory / shard.file_name
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return path


def read_shard(directory: Union[str, Path], shard: Shard) -> list[Item]:
    """The items saved for `shard`, in its image order."""
    path = Path(directory) / shard.file_name
    with np.load(path) as data:
        if tuple(int(i) for i in data["image_ids"]) != shard.image_ids:
            raise _rebuild_error(path, f"shard holds other images than shard {shard.index}")
        offsets = np.concatenate([[0], np.cumsum(data["counts"])])
        boxes, scores = data["boxes"], data["scores"]
        sources = data["sources"] if "sources" in data.files else None
    items = []
    for i, image_id in enumerate(shard.image_ids):
        rows = slice(int(offsets[i]), int(offsets[i + 1]))
        item = (image_id, boxes[rows], scores[rows])
        items.append(item if sources is None else item + (sources[rows],))
    return items


class ShardedWriter:
    """Split `image_ids` into shards of `images_per_shard` and track which are
    saved in `directory`. A killed run leaves the finished shard files; a rerun
    with the same image list computes only `pending()` ones.

        writer = ShardedWriter(out / "parts" / "mcg_train", image_ids, images_per_shard=32)
        for shard in writer.pending():
            writer.write(shard, [compute(i) for i in shard.image_ids])   # or write_shard in a Ray task
        assemble(writer, out / "sources" / "mcg_train.h5", attrs)
    """

    def __init__(self, directory: Union[str, Path], image_ids: Sequence[int], *,
                 images_per_shard: int = 32) -> None:
        if images_per_shard < 1:
            raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        ids = [int(i) for i in image_ids]
        if len(set(ids)) != len(ids):
            raise ValueError("image_ids has repeats")
        self.shards = [Shard(index=n, image_ids=tuple(ids[start:start + images_per_shard]))
                       for n, start in enumerate(range(0, len(ids), images_per_shard))]

    def is_done(self, shard: Shard) -> bool:
        return (self.directory / shard.file_name).is_file()

    def pending(self) -> list[Shard]:
        return [shard for shard in self.shards if not self.is_done(shard)]

    def write(self, shard: Shard, items: Iterable[Item]) -> Path:
        return write_shard(self.directory, shard, items)

    def iter_items(self) -> Iterator[Item]:
        """Every image's item, in image-list order; all shards must be done."""
        pending = self.pending()
        if pending:
            raise ValueError(f"{self.directory}: {len(pending)} of {len(self.shards)} shards "
                             f"are not written yet")
        for shard in self.shards:
            yield from read_shard(self.directory, shard)


def assemble(writer: ShardedWriter, path: Union[str, Path], attrs: dict) -> Path:
    """Write the store at `path` from a writer whose shards are all done."""
    return write_store(path, writer.iter_items(), attrs)


def remove_parts(directories: Iterable[Union[str, Path]]) -> None:
    """Delete the shard folders of finished work, and their parent when it is left
    empty. Call only after the stores built from them are written (atomically):
    a store's existence is what marks the work done, so a kill part-way through
    the deletion leaves nothing a rerun would read."""
    parents = set()
    for directory in directories:
        directory = Path(directory)
        shutil.rmtree(directory, ignore_errors=True)
        parents.add(directory.parent)
    for parent in parents:
        try:
            parent.rmdir()
        except OSError:  # other groups' shards are still there, or it is gone already
            pass
