"""The evaluate stage: the tuned thresholds applied to the test split's raw
candidates, scored with pycocotools (the reference), with each test-time
choice switched off in turn so its contribution is visible.

    <out>/results_<split>.json    COCO results of the final setting (flip TTA + tuned NMS + voting)
    <out>/detections_test-dev2015_<alg>_results.zip   when the split has no annotations
    <out>/metrics.json            12 COCO stats, AP per category and size, per setting
    <out>/plots/pr_curves.png, ap_by_size.png, detections.png

VOC data (split.source "voc") or evaluate.voc_metric adds the VOC devkit's
mAP to every setting: `voc07_mAP` (11-point, the metric of Tables 1 and 4-10)
and `voc12_mAP` (all-point), IoU > 0.5, difficult boxes ignored.

Settings (rows of metrics.json):
    final        flip-merged candidates, tuned NMS IoU, weighted voting at the tuned IoU
    no_flip      the same on the unflipped candidates
    no_voting    flip-merged, tuned NMS IoU, no voting
    baseline     the Appendix's comparison (item 5): unflipped round-1 candidates only
                 (one round of box regression), plain NMS at tune.baseline_nms_iou (0.3),
                 no voting
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ion.atomic import write_json_atomic
from ion.data.split import DetectionSplit
from ion.evaluation.coco_eval import coco_eval
from ion.evaluation.metrics import IOU_THRESHOLDS, MAX_DETS, CocoMetrics
from ion.evaluation.results import to_coco_results, validate_results, write_results, write_submission_zip
from ion.evaluation.voc_ap import VocMetrics, voc_eval
from ion.figures import save_png
from ion.inference.tuning import apply_thresholds
from stages.contract import StageContext, StageResult
from stages.helpers.raw_detections import ROUND1, iter_raw

NAME = "evaluate"
VERSION = "1"
READS = ("evaluate",)
UPSTREAM = ("data", "detect", "tune")

HEADLINE = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def run(cfg, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    ecfg = cfg.evaluate
    # Evaluation reads the annotation file through pycocotools; the records need paths alone.
    split = DetectionSplit.load(inputs["data"], ecfg.split, with_annotations=False)
    best = json.loads((inputs["tune"] / "best.json").read_text(encoding="utf-8"))
    files = _candidate_files(inputs["detect"], ecfg.split)
    flip_set = "flip" if "flip" in files else "plain"
    tuned = dict(nms_iou=best["nms_iou"], score_thresh=best["score_thresh"], max_dets=best["max_dets"])
    settings = {
        "final": (flip_set, {**tuned, "vote_iou": best["vote_iou"]}),
        "no_flip": ("plain", {**tuned, "vote_iou": best["vote_iou"]}),
        "no_voting": (flip_set, {**tuned, "vote_iou": None}),
        "baseline": (ROUND1, {"nms_iou": best["baseline"]["nms_iou"], "vote_iou": None}),
    }
    # Without annotations only the final setting's results are written: the others are not computed.
    computed = list(settings) if split.has_annotations else ["final"]
    detections = _post_process(files, {name: settings[name] for name in computed})
    results = to_coco_results(detections["final"], split.categories)
    validate_results(results, split.annotation_file, source=f"results_{ecfg.split}.json")
    write_results(out / f"results_{ecfg.split}.json", results)
    (out / "plots").mkdir(exist_ok=True)
    _draw_detections(split, detections["final"], ecfg.draw_images, out / "plots" / "detections.png")

    if not split.has_annotations:
        zip_path = write_submission_zip(out, results, algorithm=ecfg.algorithm)
        return StageResult(metrics={"detections": float(len(results))},
                           summary=[f"{ecfg.split} has no annotations: wrote {zip_path.name} for the COCO "
                                    f"evaluation server ({len(results)} detections); no metrics computed"])

    scored: dict[str, CocoMetrics] = {}
    with_voc = ecfg.voc_metric or split.source == "voc"
    report = {}
    for name in ctx.progress(list(settings), desc="COCO evaluation"):
        results_of_setting = to_coco_results(detections[name], split.categories)
        scored[name] = coco_eval(split.annotation_file, results_of_setting)
        report[name] = _report(scored[name], split)
        if with_voc:
            report[name].update(_voc_report(voc_eval(str(split.annotation_file), results_of_setting), split))
    report["settings"] = {name: {"candidates": which, **params} for name, (which, params) in settings.items()}
    write_json_atomic(out / "metrics.json", report)
    _plot_pr(scored, out / "plots" / "pr_curves.png")
    _plot_sizes(scored, out / "plots" / "ap_by_size.png")

    metrics = {}
    for name, entry in report.items():
        if name == "settings":
            continue
        prefix = "" if name == "final" else f"{name}_"
        metrics.update({f"{prefix}{k}": v for k, v in entry["stats"].items()})
        for key in ("context_AP", "context_AP50", "voc07_mAP", "voc12_mAP"):
            if key in entry:
                metrics[f"{prefix}{key}"] = entry[key]
    final = scored["final"].stats
    lines = [f"{ecfg.split}: AP {final['AP']:.4f}  AP50 {final['AP50']:.4f}  AP75 {final['AP75']:.4f}  "
             f"APs {final['APs']:.4f}  APm {final['APm']:.4f}  APl {final['APl']:.4f}"]
    if "context_AP" in report["final"]:
        lines.append(f"context classes: AP {report['final']['context_AP']:.4f}  "
                     f"AP50 {report['final']['context_AP50']:.4f}")
    if with_voc:
        lines.append(f"VOC mAP (IoU > 0.5): VOC07 11-point {report['final']['voc07_mAP']:.4f}  "
                     f"all-point {report['final']['voc12_mAP']:.4f}; baseline (one round, NMS "
                     f"{settings['baseline'][1]['nms_iou']:g}) VOC07 {report['baseline']['voc07_mAP']:.4f}")
    lines.append("contributions (AP): " + ", ".join(
        f"{name} {scored[name].stats['AP']:.4f}" for name in ("baseline", "no_flip", "no_voting", "final")))
    return StageResult(metrics=metrics, summary=lines)


def _post_process(files: dict[str, Path], settings: dict[str, tuple[str, dict]]) -> dict[str, dict]:
    """setting -> image id -> Detections: each setting's thresholds applied to its
    candidate set, image by image as the raw stores stream past (only the
    kept detections, at most max_dets per image, are held)."""
    needed = {which for which, _ in settings.values()}
    detections: dict[str, dict] = {name: {} for name in settings}
    for image_id, per_set in iter_raw({which: files[which] for which in files if which in needed}):
        for name, (which, params) in settings.items():
            detections[name].update(apply_thresholds({image_id: per_set[which]}, **params))
    return detections


def _candidate_files(detect_dir: Path, split: str) -> dict[str, Path]:
    files = {which: Path(detect_dir) / f"raw_{split}_{which}.h5" for which in ("plain", ROUND1, "flip")}
    # The unflipped sets are always written: without them, read_raw says which split detect lacks.
    return {which: path for which, path in files.items() if which != "flip" or path.exists()}


def _report(metrics: CocoMetrics, split: DetectionSplit) -> dict:
    entry = {"stats": metrics.stats,
             "per_category_ap": {split.categories.name(c): ap for c, ap in metrics.per_category_ap.items()},
             "per_size_ap": metrics.per_size_ap}
    context = [c for c in split.context_category_ids if c in metrics.category_ids]
    if context:
        entry["context_AP"] = float(np.mean([metrics.per_category_ap.get(c, 0.0) for c in context]))
        entry["context_AP50"] = _mean_ap_at(metrics, context, iou=0.5)
    return entry


def _voc_report(metrics: VocMetrics, split: DetectionSplit) -> dict:
    """The VOC devkit's means and per-class APs (by class name) of one setting."""
    return {"voc07_mAP": metrics.mean_ap_11_point, "voc12_mAP": metrics.mean_ap_all_point,
            "voc07_per_category_ap": {split.categories.name(c): ap for c, ap in metrics.ap_11_point.items()}}


def _mean_ap_at(metrics: CocoMetrics, category_ids: list[int], *, iou: float) -> float:
    """Mean over `category_ids` of AP at one IoU threshold (all areas, 100 detections)."""
    t = int(np.flatnonzero(np.isclose(IOU_THRESHOLDS, iou))[0])
    aps = []
    for c in category_ids:
        p = metrics.precision[t, :, metrics.category_ids.index(c), 0, MAX_DETS.index(100)]  # (R,)
        if np.any(p > -1):
            aps.append(float(np.mean(p[p > -1])))
    return float(np.mean(aps)) if aps else -1.0


# ----------------------------------------------------------------------------- plots


def _plot_pr(scored: dict[str, CocoMetrics], path: Path) -> None:
    figure = Figure(figsize=(10.0, 4.0))
    FigureCanvasAgg(figure)
    recall = np.linspace(0.0, 1.0, 101)
    for i, iou in enumerate((0.5, 0.75)):
        axes = figure.add_subplot(1, 2, i + 1)
        for name, metrics in scored.items():
            axes.plot(recall, metrics.pr_curve(iou=iou), label=f"{name} (AP {metrics.stats['AP']:.3f})")
        axes.set_xlabel("recall")
        axes.set_ylabel("precision")
        axes.set_ylim(0.0, 1.02)
        axes.set_title(f"Precision-recall at IoU {iou} (mean over classes)")
        axes.legend(loc="lower left", fontsize=8)
    _save(figure, path)


def _plot_sizes(scored: dict[str, CocoMetrics], path: Path) -> None:
    figure = Figure(figsize=(7.0, 4.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    sizes = ("small", "medium", "large")
    width = 0.8 / len(scored)
    for i, (name, metrics) in enumerate(scored.items()):
        axes.bar(np.arange(3) + i * width, [max(metrics.per_size_ap[s], 0.0) for s in sizes], width, label=name)
    axes.set_xticks(np.arange(3) + 0.4 - width / 2)
    axes.set_xticklabels(sizes)
    axes.set_ylabel("AP@[.5:.95]")
    axes.set_title("AP by object size")
    axes.legend(fontsize=8)
    _save(figure, path)


def _draw_detections(split: DetectionSplit, detections: dict, count: int, path: Path) -> None:
    """A grid of the first `count` test images with their detections scoring >= 0.5."""
    records = [r for r in split.images if r.image_id in detections][:count]
    if not records:
        return
    cols = min(3, len(records))
    rows = (len(records) + cols - 1) // cols
    figure = Figure(figsize=(4.0 * cols, 4.0 * rows))
    FigureCanvasAgg(figure)
    for i, record in enumerate(records):
        axes = figure.add_subplot(rows, cols, i + 1)
        axes.imshow(record.load())
        dets = detections[record.image_id]
        for box, score, label in zip(dets.boxes, dets.scores, dets.labels):
            if score < 0.5:
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red", linewidth=1.0))
            name = split.categories.name(split.categories.category_id(int(label)))
            axes.text(x1, y1, f"{name} {score:.2f}", fontsize=6, color="white",
                      bbox={"facecolor": "red", "alpha": 0.6, "pad": 1, "linewidth": 0})
        axes.set_axis_off()
        axes.set_title(f"image {record.image_id}", fontsize=8)
    _save(figure, path)


def _save(figure: Figure, path: Path) -> None:
    figure.tight_layout()
    save_png(figure, path, dpi=90)
