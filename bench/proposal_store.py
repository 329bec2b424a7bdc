"""Proposal store throughput: the HDF5 store (proposals/store.py) against the
same boxes as per-image .npy files and as one pickle, measured side by side.

    .venv/bin/python -m bench.proposal_store [--images 5000] [--boxes 2000] [--reads 2000] [--repeats 3]

Write: images/s to produce each layout. Read: images/s fetching `--reads`
images in random order (each image's boxes and scores). The pickle must be
loaded whole before any image can be read, so its figure includes the load.
Files are freshly written, so reads come from the OS page cache (warm). Each
figure is the best of `--repeats` runs: the machine is shared, and the best
run is the one least disturbed.
"""
import argparse
import pickle
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from proposals.store import ProposalStore, write_store


def make_items(num_images: int, boxes_per_image: int, seed: int = 0):
    """RPN-like proposals: float boxes inside a 640 x 480 image, scores best first."""
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        xy = rng.uniform(0, 600, (boxes_per_image, 2))
        wh = rng.uniform(2, 300, (boxes_per_image, 2))
        boxes = np.concatenate([xy, np.minimum(xy + wh, [640, 480])], axis=1).astype(np.float32)
        scores = np.sort(rng.random(boxes_per_image).astype(np.float32))[::-1].copy()
        yield 100000 + i, boxes, scores


def timed(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls of fn."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def dir_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--boxes", type=int, default=2000)
    parser.add_argument("--reads", type=int, default=2000, help="random-order image reads per layout")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the best is reported")
    args = parser.parse_args()

    items = list(make_items(args.images, args.boxes))
    ids = [item[0] for item in items]
    order = np.random.default_rng(1).permutation(ids)[: args.reads]
    work = Path(tempfile.mkdtemp(prefix="bench_proposal_store_"))
    rows = []  # (layout, write s, size bytes, read s, images read)
    try:
        for name, compression in (("hdf5 gzip (store default)", "gzip"), ("hdf5 lzf", "lzf"),
                                  ("hdf5 uncompressed", None)):
            path = work / f"{compression}.h5"
            write_s = timed(lambda: write_store(path, items, {"source": "bench"}, compression=compression),
                            args.repeats)

            def read_hdf5():
                with ProposalStore(path) as store:
                    for image_id in order:
                        store.get(image_id)

            rows.append((name, write_s, dir_size(path), timed(read_hdf5, args.repeats), len(order)))

        npy_dir = work / "npy"

        def write_npy():
            shutil.rmtree(npy_dir, ignore_errors=True)
            npy_dir.mkdir()
            for image_id, boxes, scores in items:
                np.save(npy_dir / f"{image_id}_boxes.npy", boxes)
                np.save(npy_dir / f"{image_id}_scores.npy", scores)

        def read_npy():
            for image_id in order:
                np.load(npy_dir / f"{image_id}_boxes.npy")
                np.load(npy_dir / f"{image_id}_scores.npy")

        write_s = timed(write_npy, args.repeats)
        rows.append(("per-image .npy", write_s, dir_size(npy_dir), timed(read_npy, args.repeats), len(order)))

        pickle_path = work / "all.pkl"

        def write_pickle():
            with open(pickle_path, "wb") as f:
                pickle.dump({image_id: (boxes, scores) for image_id, boxes, scores in items}, f,
                            protocol=pickle.HIGHEST_PROTOCOL)

        def read_pickle():
            with open(pickle_path, "rb") as f:
                table = pickle.load(f)
            for image_id in order:
                table[image_id]

        write_s = timed(write_pickle, args.repeats)
        rows.append(("one pickle (load + lookups)", write_s, dir_size(pickle_path),
                     timed(read_pickle, args.repeats), len(order)))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base_write = args.images / rows[0][1]
    base_read = rows[0][4] / rows[0][3]
    print(f"{args.images} images x {args.boxes} boxes, {args.reads} random-order reads (warm page cache), "
          f"best of {args.repeats}")
    print(f"{'layout':<30} {'write img/s':>12} {'x store':>8} {'size MB':>9} {'read img/s':>11} {'x store':>8}")
    for name, write_s, size, read_s, reads in rows:
        write_rate, read_rate = args.images / write_s, reads / read_s
        print(f"{name:<30} {write_rate:>12.0f} {write_rate / base_write:>8.2f} {size / 1e6:>9.1f} "
              f"{read_rate:>11.0f} {read_rate / base_read:>8.2f}")


if __name__ == "__main__":
    main()
