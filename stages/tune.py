"""The tune stage: an Optuna study over the NMS and weighted-voting IoU
thresholds (Appendix item 5: "evaluating all boxes once and then randomly
sampling hundreds of thresholds"), objective COCO AP@[.5:.95] on minival from
the detect stage's cached raw candidates. No network runs here.

    <out>/study.journal     the Optuna study (JournalFileBackend): a killed or
                            repeated run resumes it; `optuna-dashboard <out>/study.journal`
    <out>/best.json         the best thresholds, their AP and the baseline: one round of
                            box regression, plain NMS at tune.baseline_nms_iou, no voting,
                            no flip (Appendix item 5's comparison on minival)
    <out>/plots/history.png optimisation history
    <out>/plots/contour.png AP over (NMS IoU, voting IoU)

Trials are asked for on the driver in batches of `tune.parallel`, evaluated as
Ray tasks (each worker loads the candidates and the ground truth once), and
told back in trial order, so a seeded sampler gives the same study however
many workers there are.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ion.data.split import DetectionSplit
from ion.errors import UserError
from ion.evaluation.evaluator import Evaluator
from ion.figures import save_png
from ion.inference.tuning import Thresholds, objective
from stages.contract import StageContext, StageResult
from stages.raw_detections import ROUND1, read_raw, require_raw
from stages.worker_cache import cached
from ion.atomic import write_json_atomic

NAME = "tune"
VERSION = "2"
READS = ("seed", "tune")
UPSTREAM = ("data", "detect")

STUDY_NAME = "nms-voting"
SPLIT = "minival"


def run(cfg, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    tcfg = cfg.tune
    split = DetectionSplit.load(inputs["data"], SPLIT)
    if not split.has_annotations:
        raise UserError(f"the {SPLIT} split has no annotations: tuning needs minival ground truth")
    raw_path = raw_file(inputs["detect"], SPLIT, tcfg.use_flip)
    task = {"raw": str(raw_path), "gt": str(split.annotation_file)}
    baseline_path = Path(inputs["detect"]) / f"raw_{SPLIT}_{ROUND1}.h5"
    for path in (raw_path, baseline_path):  # both before the study starts
        require_raw(path)

    study = _open_study(out / "study.journal", tcfg, seed=cfg.seed)
    _fail_unfinished(study)
    done = len(_complete(study))
    remaining = tcfg.trials - done
    bar = ctx.progress(range(remaining), desc="tune trials", total=remaining)
    pending: list = []
    for _ in bar:
        pending.append(study.ask(_distributions(tcfg)))
        if len(pending) == tcfg.parallel:
            _evaluate_batch(study, pending, task, ctx)
            pending = []
    if pending:
        _evaluate_batch(study, pending, task, ctx)

    baseline = trial_ap({"raw": str(baseline_path), "gt": task["gt"],
                         "params": {"nms_iou": tcfg.baseline_nms_iou, "vote_iou": None}})
    trials = _complete(study)
    best = study.best_trial
    result = {**_thresholds(best.params), "AP": best.value, "trial": best.number,
              "baseline": {"nms_iou": tcfg.baseline_nms_iou, "vote_iou": None, "AP": baseline,
                           "candidates": baseline_path.name},
              "trials": len(trials), "sampler": tcfg.sampler, "candidates": raw_path.name}
    write_json_atomic(out / "best.json", result)
    (out / "plots").mkdir(exist_ok=True)
    _plot_history(trials, baseline, out / "plots" / "history.png")
    _plot_contour(trials, out / "plots" / "contour.png")
    gain = best.value - baseline
    vote = result["vote_iou"]
    return StageResult(
        metrics={"best_AP": best.value, "baseline_AP": baseline, "gain_AP": gain,
                 "best_nms_iou": result["nms_iou"], "best_vote_iou": -1.0 if vote is None else vote,
                 "trials": float(len(trials))},
        summary=[f"tuned on {SPLIT} ({len(trials)} trials, {tcfg.sampler} sampler): NMS IoU "
                 f"{result['nms_iou']:.3f}, voting IoU {vote if vote is None else round(vote, 3)} -> AP "
                 f"{best.value:.4f} vs plain NMS {tcfg.baseline_nms_iou}: {baseline:.4f} ({gain:+.4f})",
                 f"study: optuna-dashboard {out / 'study.journal'}"])


def raw_file(detect_dir: Path, split: str, flip: bool) -> Path:
    """The detect stage's candidate file of `split`: flip-merged when asked and stored."""
    flipped = Path(detect_dir) / f"raw_{split}_flip.h5"
    return flipped if flip and flipped.exists() else Path(detect_dir) / f"raw_{split}_plain.h5"


# ----------------------------------------------------------------------------- the study


def _sampler(tcfg, seed: int, done: int) -> optuna.samplers.BaseSampler:
    if tcfg.sampler == "sobol":
        # QMC picks its point from the trial number, so a resumed study continues the sequence.
        return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed,
                                          warn_independent_sampling=False, warn_asynchronous_seeding=False)
    if tcfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed + done)
    # A resumed random study must not replay the first draws: offset the seed by the trials done.
    return optuna.samplers.RandomSampler(seed=seed + done)


def _open_study(path: Path, tcfg, *, seed: int) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize",
                                load_if_exists=True)
    # The sampler is chosen once the trials already done are known (see _sampler).
    study.sampler = _sampler(tcfg, seed, len(_complete(study)))
    return study


def _distributions(tcfg) -> dict[str, optuna.distributions.BaseDistribution]:
    space = {"nms_iou": optuna.distributions.FloatDistribution(*tcfg.nms_iou),
             "vote_iou": optuna.distributions.FloatDistribution(*tcfg.vote_iou)}
    if tcfg.tune_score_thresh:
        space["score_thresh"] = optuna.distributions.FloatDistribution(*tcfg.score_thresh_range)
    if tcfg.tune_max_dets:
        space["max_dets"] = optuna.distributions.CategoricalDistribution(tuple(tcfg.max_dets_choices))
    return space


def _complete(study) -> list:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def _fail_unfinished(study: optuna.Study) -> None:
    """Trials asked for by a killed run were never told: close them as failed."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def _evaluate_batch(study: optuna.Study, trials: list, task: dict, ctx: StageContext) -> None:
    values = ctx.map(trial_ap, [{**task, "params": t.params} for t in trials], desc="trials")
    for trial, value in zip(trials, values):
        study.tell(trial, value)
        ctx.log_metrics({"trial_AP": value, **{f"trial_{k}": float(v) for k, v in trial.params.items()}},
                        step=trial.number)


def _thresholds(params: dict) -> dict:
    return {"nms_iou": params["nms_iou"], "vote_iou": params.get("vote_iou"),
            "score_thresh": params.get("score_thresh", Thresholds.__dataclass_fields__["score_thresh"].default),
            "max_dets": params.get("max_dets", Thresholds.__dataclass_fields__["max_dets"].default)}


def trial_ap(task: dict) -> float:
    """A Ray task: AP@[.5:.95] of one threshold setting on the cached candidates.
    Candidates and ground truth are loaded once per worker process."""
    evaluator, raw = cached("tune", (task["raw"], task["gt"]),
                            lambda: (Evaluator(task["gt"]), read_raw(Path(task["raw"]))))
    return objective(evaluator, raw, Thresholds(**_thresholds(task["params"])))


# ----------------------------------------------------------------------------- plots


def _plot_history(trials: list, baseline: float, path: Path) -> None:
    figure = Figure(figsize=(6.0, 4.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    numbers = [t.number for t in trials]
    values = [t.value for t in trials]
    axes.plot(numbers, values, ".", alpha=0.6, label="trial")
    axes.plot(numbers, np.maximum.accumulate(values), "-", label="best so far")
    axes.axhline(baseline, color="grey", linestyle="--", label="plain NMS baseline")
    axes.set_xlabel("trial")
    axes.set_ylabel("minival AP@[.5:.95]")
    axes.legend(loc="lower right")
    axes.set_title("Threshold tuning history")
    save_png(figure, path)


def _plot_contour(trials: list, path: Path) -> None:
    figure = Figure(figsize=(6.0, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    x = np.array([t.params["nms_iou"] for t in trials])
    y = np.array([t.params["vote_iou"] for t in trials])
    z = np.array([t.value for t in trials])
    if len(trials) >= 4 and np.ptp(x) > 0 and np.ptp(y) > 0:
        filled = axes.tricontourf(x, y, z, levels=12, cmap="viridis")
        figure.colorbar(filled, ax=axes, label="AP@[.5:.95]")
    axes.scatter(x, y, c="white", edgecolors="black", s=12)
    best = int(np.argmax(z))
    axes.scatter([x[best]], [y[best]], marker="*", c="red", s=120, label="best")
    axes.set_xlabel("NMS IoU threshold")
    axes.set_ylabel("weighted-voting IoU threshold")
    axes.legend(loc="lower left")
    axes.set_title("minival AP over the two thresholds")
    save_png(figure, path)
