"""`python -m pipeline predict --images PATH... --out DIR`: detect objects in any
images with the model a config's pipeline trained (or an MLflow model,
--model-uri), as the evaluate stage would (pipeline/commands/predict_images.py).

    <out>/detections.json      COCO results (image_id = the image's index in the listing) + file_name
    <out>/drawn/<name>.jpg     each image with its detections scoring >= --threshold

Images go to Ray tasks (pipeline/cluster/tasks.py) a chunk at a time and results are
streamed into detections.json, so memory stays bounded for thousands of photos.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ion.atomic import atomic_path
from ion.errors import UserError
from pipeline.commands.flags import config_flags, load, rerun_command

IMAGES_PER_TASK = 4
TASKS_PER_WORKER = 4  # tasks per worker in one chunk: enough to keep workers busy, little held at once
SHOWN_SKIPPED = 5
NAME = "predict"
DRAWN_DIR = "drawn"
RESULTS_FILE = "detections.json"


def add_parser(commands: Any) -> None:
    sub = commands.add_parser(
        NAME, help="detect objects in images with a config's trained model",
        description="Detects objects in image files or folders (recursive) with the model the config's pipeline "
                    "trained (its train, proposals and tune outputs in the workdir), or with an MLflow model "
                    "(--model-uri runs:/<run id>/model). Writes <out>/detections.json (COCO results + "
                    "file_name) and <out>/drawn/<name>.jpg per image.")
    sub.add_argument("--images", nargs="+", type=Path, required=True, metavar="PATH",
                     help="image files or folders (searched recursively); files that are not images are skipped")
    sub.add_argument("--out", type=Path, required=True, help="output folder")
    sub.add_argument("--threshold", type=float, default=0.5,
                     help="draw detections scoring at least this (default 0.5; detections.json has all)")
    sub.add_argument("--model-uri", default=None,
                     help="an MLflow model logged by the train stage, e.g. runs:/<run id>/model (tracking URI: "
                          "MLFLOW_TRACKING_URI, else the workdir's mlflow.db)")
    config_flags(sub)


# ----------------------------------------------------------------------------- the listing


def _candidates(paths: Sequence[Path]) -> Iterator[tuple[Path, str]]:
    """(file, name relative to the folder given) for every file under `paths`, sorted."""
    for given in paths:
        if given.is_dir():
            for folder, dirs, files in os.walk(given):
                dirs.sort()
                for name in sorted(files):
                    path = Path(folder) / name
                    yield path, path.relative_to(given).as_posix()
        elif given.is_file():
            yield given, given.name
        else:
            raise UserError(f"--images {given}: no such file or folder")


def _is_image(path: Path) -> bool:
    """PIL recognises the file's header (the pixels are read later, in the task)."""
    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


def list_images(paths: Sequence[Path]) -> tuple[list[tuple[Path, str]], list[Path]]:
    """(readable images with their drawn-image names, skipped files)."""
    images, skipped, used = [], [], set()
    for path, relative in _candidates(paths):
        if not _is_image(path):
            skipped.append(path)
            continue
        name = Path(relative).with_suffix("").as_posix().replace("/", "__")
        if name in used:  # the same relative name under two folders given
            name = f"{name}-{len(images)}"
        used.add(name)
        images.append((path, name))
    return images, skipped


# ----------------------------------------------------------------------------- the model


def _from_workdir(cfg: Any, args: argparse.Namespace):
    """(Predictor, notes) from the config's cached train, proposals and tune outputs."""
    from pipeline.cache.store import ArtifactStore
    from pipeline.commands.predict_images import RPN_FILE, THRESHOLDS_FILE, make_predictor
    from pipeline.graph import cache_keys, registered_stages

    store = ArtifactStore(Path(cfg.runtime.workdir))
    keys = cache_keys(registered_stages(), cfg)
    command = rerun_command(args)
    missing = [s for s in ("proposals", "train") if not store.exists(s, keys[s])]
    if missing:
        raise UserError(f"the {' and '.join(missing)} output(s) of this config are missing in {store.workdir}: "
                        f"run {command} --stages data,proposals,train (add tune for tuned thresholds)")
    best = None
    if store.exists("tune", keys["tune"]):
        best = json.loads((store.path("tune", keys["tune"]) / THRESHOLDS_FILE).read_text(encoding="utf-8"))
    predictor, notes = make_predictor(cfg, model_dir=store.path("train", keys["train"]),
                                      rpn_weights=store.path("proposals", keys["proposals"]) / RPN_FILE, best=best)
    if best is None:
        notes.append(f"      (run {command} --stages tune for the tuned ones)")
    return predictor, notes


def _from_mlflow(uri: str, tracking_uri: str, into: Path):
    """(Predictor, notes) from an MLflow model the train stage logged (pipeline/tracking/model.py)."""
    from pipeline.commands.predict_images import make_predictor
    from pipeline.tracking.client import download_artifacts
    from pipeline.tracking.model import ARTIFACT_CONFIG, ARTIFACT_MODEL_JSON, ARTIFACT_RPN, config_of, model_files

    files, best = model_files(download_artifacts(uri, into / "model", tracking_uri=tracking_uri))
    if ARTIFACT_MODEL_JSON not in files or ARTIFACT_CONFIG not in files:
        raise UserError(f"--model-uri {uri}: not a detector logged by the train stage (no {ARTIFACT_MODEL_JSON} / "
                        f"{ARTIFACT_CONFIG} in its artifacts)")
    cfg = config_of(files[ARTIFACT_CONFIG])
    return make_predictor(cfg, model_dir=files[ARTIFACT_MODEL_JSON].parent, rpn_weights=files.get(ARTIFACT_RPN),
                          best=best)


# ----------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> int:
    """Through the one path of the commands that use stage outputs (pipeline/execution/session.py):
    the run log in the config's workdir, the tracking server probed when --model-uri reads from it."""
    from pipeline.execution.session import stage_session

    cfg = load(args)
    headline = f"predict: {' '.join(str(p) for p in args.images)} -> {args.out} | workdir {cfg.runtime.workdir}"
    with stage_session(Path(cfg.runtime.workdir), headline=headline, stops=args.stops,
                       probe_tracking=bool(args.model_uri)):
        return run_predict(args, cfg)


def run_predict(args: argparse.Namespace, cfg: Any) -> int:
    from pipeline.cluster.tasks import Cluster
    from pipeline.commands.predict_images import PredictTask
    from pipeline.tracking.uri import tracking_uri_for

    images, skipped = list_images(args.images)
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:SHOWN_SKIPPED])
        more = f" and {len(skipped) - SHOWN_SKIPPED} more" if len(skipped) > SHOWN_SKIPPED else ""
        print(f"skipped {len(skipped)} file(s) that are not readable images: {shown}{more}", file=sys.stderr)
    if not images:
        raise UserError(f"--images {' '.join(str(p) for p in args.images)}: no readable image there "
                        "(give JPEG/PNG files or folders holding them)")
    tracking_uri = tracking_uri_for(cfg.runtime.workdir)
    with tempfile.TemporaryDirectory(prefix="ion-predict-") as tmp:
        if args.model_uri:
            predictor, notes = _from_mlflow(args.model_uri, tracking_uri, Path(tmp))
        else:
            predictor, notes = _from_workdir(cfg, args)
        for note in notes:
            print(note, file=sys.stderr)
        out = Path(args.out)
        (out / DRAWN_DIR).mkdir(parents=True, exist_ok=True)
        tasks = [PredictTask(predictor=predictor, draw_threshold=args.threshold,
                             images=tuple((i, str(path), str(out / DRAWN_DIR / f"{name}.jpg"))
                                          for i, (path, name) in enumerate(images[start:start + IMAGES_PER_TASK],
                                                                           start=start)))
                 for start in range(0, len(images), IMAGES_PER_TASK)]
        cluster = Cluster(cfg.runtime, tracking_uri=tracking_uri)
        try:
            count = _stream(tasks, cluster, out / RESULTS_FILE, total=len(images),
                            chunk=max(1, cfg.runtime.num_workers * TASKS_PER_WORKER))
        finally:
            cluster.close()
    print(f"predict: {count} detections in {len(images)} image(s) -> {out / RESULTS_FILE}; drawn (score >= "
          f"{args.threshold}) in {out / DRAWN_DIR}/")
    return 0


def _stream(tasks: list, cluster: Any, path: Path, *, total: int, chunk: int) -> int:
    """Run `tasks` a chunk at a time, writing each chunk's results to `path` (a JSON list) as it
    comes; the file appears, complete, only at the end."""
    from pipeline.commands.predict_images import predict_task

    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f, \
            tqdm(total=total, desc="predict", unit="image", disable=None) as bar:
        f.write("[")
        for start in range(0, len(tasks), chunk):
            # gpu: one actor per GPU holds the models when runtime.device allows (pipeline/cluster/tasks.py).
            for entries in cluster.map(predict_task, tasks[start:start + chunk], desc="predict tasks", gpu=True):
                for entry in entries:
                    for result in entry["results"]:
                        f.write(("\n" if count == 0 else ",\n") + json.dumps(result, separators=(",", ":")))
                        count += 1
                    bar.update(1)
        f.write("\n]\n")
    return count
