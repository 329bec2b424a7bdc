"""One tune trial at minival scale: post-processing + the fast evaluator
against post-processing + pycocotools.

A synthetic minival: 5000 images, 80 COCO categories, ~7 objects per image
(COCO's size mix, 1% crowd), ~650 raw candidates per image (clusters of
jittered boxes around each object, some with the wrong class, plus background
boxes), all with score >= 0.05, as detect stores them. A trial applies NMS +
weighted voting + top 100 per image and scores the result; the bench prints
seconds per trial for each evaluator side by side, their ratio, whether the
12 stats agree, and the trial throughput with 1 and 2 worker processes.

    .venv/bin/python -m bench.tune_trial [--images 5000] [--trials 3]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing as mp
import os
import time

import numpy as np
import torch

from ion.data.categories import CategoryMap
from ion.evaluation.coco_eval import coco_eval
from ion.evaluation.evaluator import Evaluator, flatten_detections
from ion.inference.postprocess import Detections
from ion.inference.tuning import Thresholds, apply_thresholds

# COCO's 80 category ids (1..90 with gaps)
COCO_IDS = tuple(i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
TRIALS = (Thresholds(nms_iou=0.443, vote_iou=0.854), Thresholds(nms_iou=0.3, vote_iou=None),
          Thresholds(nms_iou=0.6, vote_iou=0.7), Thresholds(nms_iou=0.5, vote_iou=0.95))

# Set before the worker pool forks, so workers share them copy-on-write.
_EVALUATOR: Evaluator | None = None
_RAW: dict[int, Detections] | None = None


def make_minival(*, num_images: int, seed: int) -> tuple[dict, dict[int, Detections]]:
    """(COCO ground truth dict, image id -> raw candidates), synthetic."""
    rng = np.random.default_rng(seed)
    freq = 1.0 / np.arange(1, len(COCO_IDS) + 1)  # Zipf-like: a few categories dominate, as person does
    freq /= freq.sum()
    widths = np.full(num_images, 640.0)
    heights = rng.integers(360, 641, num_images).astype(np.float64)

    n_obj = np.minimum(1 + rng.poisson(6.3, num_images), 50)
    obj_img = np.repeat(np.arange(num_images), n_obj)  # (G,)
    G = len(obj_img)
    side = np.exp(rng.uniform(np.log(6), np.log(400), G))  # sqrt(area): ~40% small, ~35% medium
    aspect = np.exp(rng.normal(0, 0.5, G))
    w = np.minimum(side * np.sqrt(aspect), widths[obj_img] - 1)
    h = np.minimum(side / np.sqrt(aspect), heights[obj_img] - 1)
    x = rng.uniform(0, widths[obj_img] - w)
    y = rng.uniform(0, heights[obj_img] - h)
    obj_label = rng.choice(len(COCO_IDS), G, p=freq) + 1  # (G,) 1..K
    crowd = rng.random(G) < 0.01
    gt = {
        "images": [{"id": i + 1, "width": int(widths[i]), "height": int(heights[i]), "file_name": f"{i + 1}.jpg"}
                   for i in range(num_images)],
        "categories": [{"id": c, "name": f"c{c}", "supercategory": "x"} for c in COCO_IDS],
        "annotations": [{"id": g + 1, "image_id": int(obj_img[g]) + 1, "category_id": COCO_IDS[obj_label[g] - 1],
                         "bbox": [float(x[g]), float(y[g]), float(w[g]), float(h[g])],
                         "area": float(w[g] * h[g] * rng.uniform(0.5, 0.9)), "iscrowd": int(crowd[g]),
                         "segmentation": []} for g in range(G)],
    }

    # Clusters around objects: both regression rounds' boxes, localisation
    # quality varying per candidate, score falling with the jitter.
    n_cand = rng.integers(10, 80, G)
    c_obj = np.repeat(np.arange(G), n_cand)  # (C,)
    C = len(c_obj)
    sigma = rng.uniform(0.02, 0.3, C)
    cw = w[c_obj] * np.exp(rng.normal(0, sigma))
    ch = h[c_obj] * np.exp(rng.normal(0, sigma))
    cx = x[c_obj] + w[c_obj] / 2 + rng.normal(0, sigma * w[c_obj])
    cy = y[c_obj] + h[c_obj] / 2 + rng.normal(0, sigma * h[c_obj])
    quality = rng.uniform(0.3, 1.0, G)[c_obj]
    c_score = quality * np.exp(-3 * sigma) + rng.normal(0, 0.08, C)
    c_label = obj_label[c_obj].copy()
    confused = rng.random(C) < 0.15
    c_label[confused] = rng.choice(len(COCO_IDS), confused.sum(), p=freq) + 1
    c_score[confused] *= 0.4
    c_img = obj_img[c_obj]

    # Background candidates: anywhere, any class, low scores.
    n_bg = rng.integers(100, 600, num_images)
    b_img = np.repeat(np.arange(num_images), n_bg)
    B = len(b_img)
    bw = np.exp(rng.uniform(np.log(8), np.log(400), B))
    bh = bw * np.exp(rng.normal(0, 0.5, B))
    bx = rng.uniform(0, widths[b_img])
    by = rng.uniform(0, heights[b_img])
    b_label = rng.choice(len(COCO_IDS), B, p=freq) + 1
    b_score = 0.05 + rng.exponential(0.08, B)

    img = np.concatenate([c_img, b_img])
    boxes = np.concatenate([np.stack([cx - cw / 2, cy - ch / 2, cx + cw / 2, cy + ch / 2], 1),
                            np.stack([bx - bw / 2, by - bh / 2, bx + bw / 2, by + bh / 2], 1)])
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, widths[img][:, None])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, heights[img][:, None])
    scores = np.concatenate([c_score, b_score]).clip(0, 1)
    labels = np.concatenate([c_label, b_label])
    keep = scores >= 0.05
    img, boxes, scores, labels = img[keep], boxes[keep], scores[keep], labels[keep]
    order = np.argsort(img, kind="stable")
    splits = np.cumsum(np.bincount(img, minlength=num_images))[:-1]
    raw = {}
    for i, (b, s, lab) in enumerate(zip(np.split(boxes[order].astype(np.float32), splits),
                                      np.split(scores[order].astype(np.float32), splits),
                                      np.split(labels[order].astype(np.int64), splits))):
        raw[i + 1] = Detections(b, s, lab)
    return gt, raw


def _postprocess(params: Thresholds) -> dict[int, Detections]:
    return apply_thresholds(_RAW, nms_iou=params.nms_iou, vote_iou=params.vote_iou,
                            score_thresh=params.score_thresh, max_dets=params.max_dets)


def fast_trial(params: Thresholds) -> float:
    """A tune trial as the tune stage runs it: AP from raw candidates."""
    return _EVALUATOR.evaluate(_postprocess(params)).stats["AP"]


def _pycocotools_results(dets: dict[int, Detections], categories: CategoryMap) -> list[dict]:
    """COCO results dicts with the exact floats the fast Evaluator sees (no rounding)."""
    image_ids, boxes, scores, cat_ids = flatten_detections(dets, categories)
    return [{"image_id": i, "category_id": c, "bbox": b, "score": s}
            for i, c, b, s in zip(image_ids.tolist(), cat_ids.tolist(), boxes.tolist(), scores.tolist())]


def _faster_coco_eval_stats(gt: dict, results: list[dict]) -> np.ndarray:
    from faster_coco_eval import COCO as FCOCO
    from faster_coco_eval import COCOeval_faster
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = FCOCO(gt)
        evaluation = COCOeval_faster(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return np.asarray(evaluation.stats[:12])


def _timed_trial(params: Thresholds) -> tuple[float, float]:
    """(AP, CPU seconds) of one trial, in a worker."""
    start = time.process_time()
    ap = fast_trial(params)
    return ap, time.process_time() - start


def _throughput(workers: int, trials: int) -> tuple[float, float]:
    """(trials per minute of wall time, median CPU seconds per trial) with `workers` processes."""
    params = [TRIALS[i % len(TRIALS)] for i in range(trials)]
    with mp.get_context("fork").Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        pool.map(_timed_trial, params[:workers], chunksize=1)  # warm-up: fork's copy-on-write page faults
        start = time.perf_counter()
        done = pool.map(_timed_trial, params, chunksize=1)
        wall = time.perf_counter() - start
    return 60 * trials / wall, float(np.median([cpu for _, cpu in done]))


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float], wall: list, cpu: list) -> None:
    wall.append(time.perf_counter() - start[0])
    cpu.append(time.process_time() - start[1])


def main() -> None:
    global _EVALUATOR, _RAW
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--trials", type=int, default=3, help="trials timed with the fast evaluator")
    parser.add_argument("--pycocotools-trials", type=int, default=1, help="trials timed with pycocotools "
                                                                         "(minutes each at 5000 images)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    start = time.perf_counter()
    gt, _RAW = make_minival(num_images=args.images, seed=0)
    n_raw = sum(len(r.scores) for r in _RAW.values())
    print(f"synthetic minival: {args.images} images, {len(gt['annotations'])} objects, "
          f"{n_raw / args.images:.0f} raw candidates per image ({time.perf_counter() - start:.1f} s to make)")
    start = time.perf_counter()
    _EVALUATOR = Evaluator(gt)
    categories = _EVALUATOR.categories
    print(f"Evaluator built once from the ground truth: {time.perf_counter() - start:.2f} s")

    timings = {name: ([], []) for name in ("post", "fast", "coco", "fce")}
    max_diff = 0.0
    for n in range(max(args.trials, args.pycocotools_trials)):
        params = TRIALS[n % len(TRIALS)]
        start = _clock()
        dets = _postprocess(params)
        _since(start, *timings["post"])
        start = _clock()
        fast = _EVALUATOR.evaluate(dets)
        _since(start, *timings["fast"])
        n_dets = sum(len(d.scores) for d in dets.values())
        line = f"trial {n} {params}: {n_dets / args.images:.0f} dets/image, AP {fast.stats['AP']:.4f}"
        if n < args.pycocotools_trials:
            start = _clock()
            reference = coco_eval(gt, _pycocotools_results(dets, categories))
            _since(start, *timings["coco"])
            diff = max(abs(fast.stats[k] - reference.stats[k]) for k in fast.stats)
            max_diff = max(max_diff, diff)
            start = _clock()
            fce = _faster_coco_eval_stats(gt, _pycocotools_results(dets, categories))
            _since(start, *timings["fce"])
            line += (f"; 12 stats vs pycocotools: max |diff| {diff:.1e}"
                     f", faster-coco-eval vs pycocotools {np.abs(fce - list(reference.stats.values())).max():.1e}")
        print(line, flush=True)

    med = {name: (float(np.median(w)), float(np.median(c))) for name, (w, c) in timings.items()}
    post, fast, coco, fce = med["post"], med["fast"], med["coco"], med["fce"]
    print()
    print(f"{'per trial, one process':<40}{'wall s':>9}{'CPU s':>9}{'ratio (CPU)':>13}")
    rows = [("postprocess (NMS + voting + top 100)", post, None),
            ("fast Evaluator", fast, None),
            ("pycocotools (results list + COCOeval)", coco, None),
            ("faster-coco-eval (list + COCOeval)", fce, None),
            ("trial: postprocess + fast Evaluator", (post[0] + fast[0], post[1] + fast[1]), 1.0),
            ("trial: postprocess + pycocotools", (post[0] + coco[0], post[1] + coco[1]),
             (post[1] + coco[1]) / (post[1] + fast[1])),
            ("trial: postprocess + faster-coco-eval", (post[0] + fce[0], post[1] + fce[1]),
             (post[1] + fce[1]) / (post[1] + fast[1]))]
    for name, (wall, cpu), ratio in rows:
        print(f"{name:<40}{wall:>9.2f}{cpu:>9.2f}" + (f"{ratio:>13.1f}" if ratio else ""))
    print(f"evaluation alone (CPU): pycocotools / fast Evaluator = {coco[1] / fast[1]:.0f}x, "
          f"faster-coco-eval / fast Evaluator = {fce[1] / fast[1]:.1f}x; 12 stats max |diff| = {max_diff:.1e}")
    print()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (other processes share them)")
    one, one_cpu = _throughput(1, args.trials)
    two, two_cpu = _throughput(2, 2 * args.trials)
    print(f"throughput, 1 worker: {one:.1f} trials/min ({one_cpu:.1f} CPU s/trial); "
          f"2 workers: {two:.1f} trials/min ({two_cpu:.1f} CPU s/trial); scaling x{two / one:.2f}")


if __name__ == "__main__":
    main()
