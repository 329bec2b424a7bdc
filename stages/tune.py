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
told back in trial order. Trial k's parameters depend only on the seed and k
(random, sobol) or on them and the batches before (tpe), never on whether
the run was killed and resumed: a resumed study takes up the trials the
killed run asked for with their own parameters, so best.json is the same.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ion.atomic import write_bytes_atomic, write_json_atomic
from ion.data.split import DetectionSplit
from ion.errors import UserError
from ion.evaluation.evaluator import Evaluator
from ion.figures import save_png
from ion.inference.tuning import Thresholds, objective
from stages.contract import StageContext, StageResult
from stages.helpers.raw_detections import ROUND1, read_raw, require_raw
from stages.helpers.worker_cache import cached

NAME = "tune"
VERSION = "2"
READS = ("seed", "tune")
UPSTREAM = ("data", "detect")

STUDY_NAME = "nms-voting"
SPLIT = "minival"


def run(cfg, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    tcfg = cfg.tune
    split = DetectionSplit.load(inputs["data"], SPLIT, with_annotations=False)  # trials read the json
    if not split.has_annotations:
        raise UserError(f"the {SPLIT} split has no annotations: tuning needs minival ground truth")
    raw_path = raw_file(inputs["detect"], SPLIT, tcfg.use_flip)
    task = {"raw": str(raw_path), "gt": str(split.annotation_file)}
    baseline_path = Path(inputs["detect"]) / f"raw_{SPLIT}_{ROUND1}.h5"
    for path in (raw_path, baseline_path):  # both before the study starts
        require_raw(path)

    study = _open_study(out / "study.journal")
    # Progress counts batches: the wrapper times each one from the moment it is asked for.
    batches = range(_first_open_batch(study, tcfg.parallel), tcfg.trials, tcfg.parallel)
    for first in ctx.progress(batches, desc=f"tune trials ({tcfg.parallel} per batch)", unit="batches"):
        batch = _ask_batch(study, tcfg, seed=cfg.seed, numbers=range(first, min(first + tcfg.parallel, tcfg.trials)))
        if batch:
            _evaluate_batch(study, batch, task, ctx)

    baseline = trial_ap({"raw": str(baseline_path), "gt": task["gt"],
                         "params": {"nms_iou": tcfg.baseline_nms_iou, "vote_iou": None}})
    trials = _complete(study)
    best = study.best_trial
    result = {**_thresholds(best.params), "AP": best.value, "trial": best.number,
              "baseline": {"nms_iou": tcfg.baseline_nms_iou, "vote_iou": None, "AP": baseline,
                           "candidates": baseline_path.name},
              "trials": len(trials), "sampler": tcfg.sampler, "candidates": raw_path.name}
    write_json_atomic(out / "best.json", result)
    ctx.link_to_model(out / "best.json", "thresholds/best.json")  # the thresholds travel with the model
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


def trial_params(tcfg, *, seed: int, number: int) -> dict | None:
    """The parameters of trial `number` for the random and sobol samplers, a
    function of (seed, number) alone: a study killed and resumed asks exactly what
    an uninterrupted one asks. None for tpe, whose draw depends on the trials told
    before (see _ask_batch)."""
    space = _distributions(tcfg)
    if tcfg.sampler == "random":
        unit = np.random.default_rng([seed, number]).random(len(space))
    elif tcfg.sampler == "sobol":
        from scipy.stats import qmc  # 1 s to import: only for this sampler

        sobol = qmc.Sobol(d=len(space), scramble=True, seed=seed)
        if number:  # scipy's fast_forward(0) overflows
            sobol.fast_forward(number)
        unit = sobol.random(1)[0]
    else:
        return None
    params = {}
    for u, (name, dist) in zip(unit, space.items()):
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            params[name] = dist.choices[min(int(u * len(dist.choices)), len(dist.choices) - 1)]
        else:
            params[name] = float(dist.low + u * (dist.high - dist.low))
    return params


_FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)


def _trial_seed(seed: int, number: int) -> int:
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def _first_open_batch(study: optuna.Study, parallel: int) -> int:
    """The first trial number of the first batch not wholly told: batches are
    [0, P), [P, 2P), ... in every run, so a resumed study asks as an uninterrupted one."""
    finished = {t.number for t in study.get_trials(deepcopy=False, states=_FINISHED)}
    first = 0
    while all(n in finished for n in range(first, first + parallel)):
        first += parallel
    return first


def _ask_batch(study: optuna.Study, tcfg, *, seed: int, numbers: range) -> list[tuple[int, dict]]:
    """(number, params) of trials `numbers` still to evaluate: those a killed run
    asked for and never told are taken up again with their own parameters, the
    missing ones asked for.

    Every trial's parameters are chosen before it is written to the journal and
    written with it in one record (enqueue_trial's fixed params), so a run killed
    while Optuna was writing the trial's records leaves either no trial or one
    whose parameters are all known."""
    space = _distributions(tcfg)
    existing = {t.number: t for t in study.get_trials(deepcopy=False)}
    batch = []
    for number in numbers:
        if number in existing:
            if existing[number].state not in _FINISHED:
                batch.append((number, _take_up(study, existing[number], space)))
            continue
        assert len(study.get_trials(deepcopy=False)) == number, "trial numbers are consecutive"
        params = trial_params(tcfg, seed=seed, number=number)
        if params is None:
            params = _tpe_params(study, space, seed=_trial_seed(seed, number))
        study.enqueue_trial(params)
        trial = study.ask(space)
        assert trial.number == number and trial.params == params
        batch.append((number, params))
    return batch


def _tpe_params(study: optuna.Study, space: dict, *, seed: int) -> dict:
    """TPE's draw for the next trial, seeded, from the trials told so far (those
    asked but not told are no part of its history, as in Optuna's own TPE)."""
    replica = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    replica.add_trials(_complete(study))
    return replica.ask(space).params


def _take_up(study: optuna.Study, trial: optuna.trial.FrozenTrial, space: dict) -> dict:
    """A trial a killed run left asked-for but not told: its parameters complete
    in the journal (the run may have died between them) and running."""
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    missing = [name for name in space if name not in params]
    if missing:
        raise UserError(f"study trial {trial.number} has no value for {missing} (a journal written by another "
                        "program?); delete <out>/study.journal to start the study anew")
    storage, trial_id = study._storage, trial._trial_id  # Optuna has no public API to complete a trial's params
    if trial.state == optuna.trial.TrialState.WAITING:
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING)
    for name, dist in space.items():
        if name not in trial.params:
            storage.set_trial_param(trial_id, name, dist.to_internal_repr(params[name]), dist)
    return {name: params[name] for name in space}


def _open_study(path: Path) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    repair_journal(path)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize", load_if_exists=True)


def repair_journal(path: Path) -> None:
    """Drop a torn last line (a run killed while Optuna appended it) so the study
    loads: the trials told before stay, one cut short is asked again. A damaged
    line before the last is a UserError naming the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: what follows the last newline (b"" when whole)
    good = len(complete)
    while good and not _is_json(complete[good - 1]):
        good -= 1
    bad = [i for i in range(good) if not _is_json(complete[i])]
    if bad:
        raise UserError(f"{path}: line {bad[0] + 1} is not a journal record (the file was edited or damaged); "
                        f"delete the file to start the study anew (rerun with --stages tune)")
    if good == len(complete) and not tail:
        return
    print(f"{path}: dropped a torn last record ({len(data) - sum(len(x) + 1 for x in complete[:good])} bytes) "
          "left by a run that was killed", flush=True)
    write_bytes_atomic(path, b"".join(line + b"\n" for line in complete[:good]))


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


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


def _evaluate_batch(study: optuna.Study, trials: list[tuple[int, dict]], task: dict, ctx: StageContext) -> None:
    values = ctx.map(trial_ap, [{**task, "params": params} for _, params in trials], desc="trials")
    for (number, params), value in zip(trials, values):
        study.tell(number, value)
        ctx.log_metrics({"trial_AP": value, **{f"trial_{k}": float(v) for k, v in params.items()}}, step=number)


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
