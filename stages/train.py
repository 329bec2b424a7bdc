"""The train stage: multi-phase ION training with momentum kept across phases
(Sec. 4.1 and the Appendix), resumable exactly, on one process or Ray Train.

    <out>/checkpoints/last.pt               rolling: every train.checkpoint_every iterations and at phase ends
    <out>/checkpoints/phase<i>_<name>.pt    the state at the end of each phase (weights, momentum, RNG, ...)
    <out>/final.pt                          {"model": state_dict}: the trained weights
    <out>/model.json                        model config, num_classes, category ids: what rebuilds the detector
    <out>/plots/loss_phase<i>_<name>.png    loss curves (per term) and learning rate of each phase
    <out>/ray/                              Ray Train's storage, when it ran there

One process (gradient accumulation over the minibatch's images) when
runtime.train_workers is 1 and there is no GPU; otherwise Ray Train
(pipeline/cluster/train.py) with runtime.train_workers workers, one GPU each
when the cluster has GPUs. A rerun with the same cache key resumes from the
last checkpoint (out/checkpoints/last.pt, or Ray Train's latest) and ends
exactly where an uninterrupted run would (bitwise on the CPU).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional

import torch

from ion.atomic import write_json_atomic
from ion.data.split import DetectionSplit
from ion.data.train_samples import TrainingSamples
from ion.engine.checkpoint import CheckpointFiles, load_checkpoint, write_checkpoint
from ion.engine.loop import NonFiniteLossError, TrainResult, train
from ion.errors import UserError
from ion.figures import save_png
from ion.modeling.build import build_detector
from ion.modeling.config import ModelConfig
from ion.schema import Origin, build
from proposals.store import ProposalStore
from stages.contract import StageContext, StageResult, TrainerSetup
from stages.helpers.worker_resume import keep_checkpoints, worker_start

NAME = "train"
VERSION = "1"
READS = ("seed", "model", "train")
UPSTREAM = ("data", "proposals")

MODEL_FILE = "model.json"
WEIGHTS_FILE = "final.pt"
RPN_FILE = "rpn.pt"  # in the proposals stage's output
RAY_RUN_NAME = "train"


def run(cfg, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    tcfg = cfg.train
    proposal_files = phase_proposal_files(tcfg, Path(inputs["proposals"]))
    workers = ctx.runtime.train_workers
    if tcfg.images_per_batch % workers:
        raise UserError(f"runtime.train_workers: {workers} does not divide train.images_per_batch "
                        f"{tcfg.images_per_batch} (each worker takes the same number of images per update); "
                        "use a divisor of it")
    split = DetectionSplit.load(Path(inputs["data"]), "train", with_annotations=False)  # its categories
    files = CheckpointFiles(out / "checkpoints")
    distributed, use_gpu = ctx.train_placement()
    if distributed:
        # The workers logged the losses to this stage's MLflow run as they trained.
        result_summary, state = _run_ray(cfg, ctx=ctx, inputs=inputs, out=out, files=files, use_gpu=use_gpu)
        mode = f"Ray Train, {workers} worker(s){' on GPUs' if use_gpu else ' on CPUs'}"
    else:
        resume = files.latest()
        if resume is not None:  # the resumed run's MLflow run gets the whole curve
            for record in resume["history"]:
                ctx.log_metrics(_loggable(record), step=int(record["iteration"]))
        total = sum(phase.iterations for phase in tcfg.phases)
        start = resume["iteration"] if resume is not None else 0
        bar = iter(ctx.progress(range(start, total), desc="train", total=total - start,
                                  unit="iterations"))
        # SIGTERM/SIGINT: finish the current update, checkpoint it, stop (the rerun resumes there).
        with ctx.graceful_stop() as should_stop:
            result = train_detector(cfg, data_dir=Path(inputs["data"]), proposal_files=proposal_files,
                                    resume=resume, save_checkpoint=files, device=torch.device("cpu"),
                                    log_metrics=lambda step, record: ctx.log_metrics(_loggable(record), step=step),
                                    on_iteration=lambda _: next(bar, None), should_stop=should_stop)
        for _ in bar:  # close the bar
            pass
        result_summary = {"iterations": result.iterations, "seconds": result.seconds,
                          "images_per_s": result.images_per_s, "started_at": result.start_iteration}
        state = files.latest()
        mode = "one process, CPU"
    write_checkpoint({"model": state["model"]}, out / WEIGHTS_FILE)
    write_json_atomic(out / MODEL_FILE, {
        "model": dataclasses.asdict(cfg.model), "num_classes": split.categories.num_classes,
        "category_ids": list(split.categories.ids), "category_names": list(split.categories.names),
        "weights": WEIGHTS_FILE, "iterations": state["iteration"],
    })
    rpn = Path(inputs["proposals"]) / RPN_FILE
    # The detector as an MLflow model, with the RPN that makes the test mix's boxes.
    ctx.log_model({MODEL_FILE: out / MODEL_FILE, WEIGHTS_FILE: out / WEIGHTS_FILE,
                   **({RPN_FILE: rpn} if rpn.is_file() else {})})
    plots = plot_loss_curves(state["history"], tcfg.phases, out / "plots")
    history = state["history"]
    final_loss = history[-1]["loss"] if history else float("nan")
    first_loss = history[0]["loss"] if history else float("nan")
    metrics = {"iterations": float(state["iteration"]), "final_loss": final_loss, "first_loss": first_loss,
               "images_per_s": float(result_summary["images_per_s"]), "train_seconds": float(result_summary["seconds"])}
    resumed = (f", resumed at iteration {result_summary['started_at']}" if result_summary["started_at"] else "")
    summary = [f"train: {state['iteration']} iterations in {len(tcfg.phases)} phase(s), loss {first_loss:.3f} -> "
               f"{final_loss:.3f}, {result_summary['images_per_s']:.1f} images/s ({mode}{resumed})",
               f"train: checkpoints in {files.directory}, weights {out / WEIGHTS_FILE}, {len(plots)} loss plot(s)"]
    return StageResult(metrics=metrics, summary=summary)


def phase_proposal_files(tcfg, proposals_dir: Path) -> list[Path]:
    """The proposal store each phase trains on (docs/CONTRACTS.md, proposals stage outputs)."""
    files = []
    for i, phase in enumerate(tcfg.phases):
        path = (proposals_dir / "mixed_train.h5" if phase.proposals == "mix"
                else proposals_dir / "sources" / f"{phase.proposals}_train.h5")
        if not path.is_file():
            available = sorted(p.name for p in (proposals_dir / "sources").glob("*_train.h5"))
            raise UserError(f"train.phases[{i}].proposals: {phase.proposals!r} needs {path}, which the proposals "
                            f"stage did not write (it has mixed_train.h5 and sources {available}); choose one of "
                            "those, or make the proposals section compute that source")
        files.append(path)
    return files


def train_detector(cfg, *, data_dir: Path, proposal_files: list[Path], resume: Optional[dict],
                   save_checkpoint: Callable, device: torch.device, log_metrics: Optional[Callable] = None,
                   on_iteration: Optional[Callable] = None, should_stop: Optional[Callable[[], bool]] = None,
                   rank: int = 0, world_size: int = 1) -> TrainResult:
    """Build the detector and its training samples, then run ion.train_loop.train.
    A non-finite loss is a UserError: its message says where and what to change."""
    tcfg, mcfg = cfg.train, cfg.model
    with_masks = mcfg.seg_loss_weight > 0  # the polygons are most of COCO's json: only when the loss needs them
    split = DetectionSplit.load(data_dir, "train", with_masks=with_masks)
    torch.manual_seed(cfg.seed)  # the initial weights (overwritten when resuming)
    model = build_detector(mcfg, num_classes=split.categories.num_classes)
    stores = {path: ProposalStore(path) for path in dict.fromkeys(proposal_files)}
    try:
        samples = TrainingSamples(records=split.images, categories=split.categories,
                                  proposal_sets=[stores[path] for path in proposal_files],
                                  min_size=mcfg.input.min_size, max_size=mcfg.input.max_size,
                                  pixel_mean=mcfg.input.pixel_mean, pixel_std=mcfg.input.pixel_std,
                                  flip=tcfg.flip, with_masks=with_masks)
        return train(model=model, phases=tcfg.phases, num_images=len(samples), get_sample=samples, seed=cfg.seed,
                     save_checkpoint=save_checkpoint, log_metrics=log_metrics, on_iteration=on_iteration,
                     should_stop=should_stop, resume=resume, images_per_batch=tcfg.images_per_batch,
                     clip_grad_norm=tcfg.clip_grad_norm,
                     momentum_semantics=tcfg.momentum_semantics, checkpoint_every=tcfg.checkpoint_every,
                     log_every=tcfg.log_every, amp=tcfg.amp, device=device, loader_threads=tcfg.loader_threads,
                     rank=rank, world_size=world_size)
    except NonFiniteLossError as err:
        raise UserError(non_finite_message(str(err))) from None
    finally:
        for store in stores.values():
            store.close()


def non_finite_message(detail: str) -> str:
    """The one line for a loss that went NaN or infinite: where (from the engine) and what to change."""
    return (f"train: {detail}; lower train.phases[*].lr_start, set train.clip_grad_norm, or check "
            "model.input.pixel_mean/pixel_std and the data; the rerun resumes from that checkpoint")


def train_worker(session, *, cfg, data_dir: str, proposal_files: list[str], fallback_resume: str) -> dict:
    """A Ray Train worker (pipeline/cluster/train.py runs it on every worker).
    Rank 0 logs the losses to the stage's MLflow run as it trains, and reports
    its progress for the driver to print.

    Resumes from Ray Train's latest checkpoint, or from out/checkpoints/last.pt
    when that one is further along (a run that was single-process before)."""
    resume = worker_start(session, Path(fallback_resume), _loggable)
    total = sum(phase.iterations for phase in cfg.train.phases)
    result = train_detector(cfg, data_dir=Path(data_dir), proposal_files=[Path(p) for p in proposal_files],
                            resume=resume, save_checkpoint=session.save, device=session.device,
                            log_metrics=lambda step, record: session.log_metrics(_loggable(record), step=step),
                            on_iteration=lambda done: session.report_progress(done, total,
                                                                              cfg.train.images_per_batch),
                            should_stop=session.should_stop, rank=session.rank, world_size=session.world_size)
    return {"iterations": result.iterations, "seconds": result.seconds, "images_per_s": result.images_per_s,
            "started_at": result.start_iteration}


def _run_ray(cfg, *, ctx: StageContext, inputs: dict[str, Path], out: Path, files: CheckpointFiles,
             use_gpu: bool) -> tuple[dict, dict]:
    """Train under Ray Train, then copy the kept checkpoints into out/checkpoints."""
    tcfg = cfg.train
    runtime = ctx.runtime
    setup = TrainerSetup(num_workers=runtime.train_workers, use_gpu=use_gpu, storage_dir=out / "ray",
                         name=RAY_RUN_NAME, max_failures=tcfg.max_failures, keep_checkpoints=len(tcfg.phases) + 1)
    worker_config = {"cfg": cfg, "data_dir": str(inputs["data"]),
                     "proposal_files": [str(p) for p in phase_proposal_files(tcfg, Path(inputs["proposals"]))],
                     "fallback_resume": str(files.last)}
    try:
        outcome = ctx.run_trainer(train_worker, worker_config, setup)
    except NonFiniteLossError as err:
        raise UserError(non_finite_message(str(err))) from None
    keep_checkpoints(outcome, files)
    return outcome.return_value, files.latest()


def _loggable(record: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k != "iteration"}


def plot_loss_curves(history: list[dict[str, float]], phases, directory: Path) -> list[Path]:
    """One PNG per phase: the loss terms (per image) and the learning rate against the iteration."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for i, phase in enumerate(phases):
        records = [r for r in history if int(r["phase"]) == i]
        if not records:
            continue
        fig = Figure(figsize=(7, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        x = [r["iteration"] for r in records]
        for key in sorted(k for k in records[0] if k.startswith("loss")):
            ax.plot(x, [r[key] for r in records], label=key, linewidth=2.0 if key == "loss" else 1.0)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss per image")
        ax.legend(loc="upper right", fontsize=8)
        lr_axis = ax.twinx()
        lr_axis.plot(x, [r["lr"] for r in records], color="grey", linestyle="--", linewidth=1.0)
        lr_axis.set_yscale("log")
        lr_axis.set_ylabel("learning rate (dashed)")
        ax.set_title(f"phase {i} '{phase.name}': frozen {list(phase.frozen) or 'nothing'}, "
                     f"momentum {phase.momentum}", fontsize=9)
        fig.tight_layout()
        written.append(save_png(fig, directory / f"loss_phase{i}_{phase.name}.png"))
    return written


def load_trained_detector(train_dir: Path, *, device: torch.device) -> tuple[torch.nn.Module, ModelConfig]:
    """The trained detector (eval mode, on `device`) and its ModelConfig, from a
    train stage output: model.json + final.pt."""
    train_dir = Path(train_dir)
    path = train_dir / MODEL_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable ({err}); rerun the train stage: "
                        "python -m pipeline run --stages train --force") from None
    # The trained weights replace ImageNet's: do not read that file again.
    saved = build(ModelConfig, spec["model"], origin=Origin(label=f"{path}: model", base_dir=train_dir))
    model_cfg = dataclasses.replace(saved, imagenet_weights=None)
    model = build_detector(model_cfg, num_classes=int(spec["num_classes"]))
    model.load_state_dict(load_checkpoint(train_dir / spec["weights"])["model"])
    return model.to(device).eval(), model_cfg
