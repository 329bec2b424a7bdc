"""`python -m pipeline predict --images PATH... --out DIR`: detect objects in any
images with the model a config's pipeline trained (or an MLflow model,
--model-uri), as the evaluate stage would (pipeline/commands/predict_images.py).

    <out>/detections.json      COCO results (image_id = the image's index in the listing) + file_name
    <out>/drawn/<name>.jpg     each image with its detections scoring >= --threshold (one per input)

Images go to Ray tasks (pipeline/cluster/tasks.py) a chunk at a time, as their bytes,
and the drawn images come back as bytes, so workers on other nodes need no view
of the driver's disk; results are streamed into detections.json, so memory stays
bounded for thousands of photos. Files that are not regular (a FIFO), unreadable,
not images, declare too many pixels or are truncated are skipped and named; the
others are predicted.
"""
from __future__ import annotations

import argparse
import json
import os
import stat
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
# PIL's own limit (Image.MAX_IMAGE_PIXELS, ~89 Mpx): larger headers are refused before any pixel is
# decoded, so a file declaring 180 Mpx is skipped and named instead of exhausting a worker's memory.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
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
                    "(--model-uri runs:/<run id>/model or models:/<name>@<alias>). Writes <out>/detections.json "
                    "(COCO results + file_name) and <out>/drawn/<name>.jpg per image.")
    sub.add_argument("--images", nargs="+", type=Path, required=True, metavar="PATH",
                     help="image files or folders (searched recursively); files that are not images are skipped")
    sub.add_argument("--out", type=Path, required=True, help="output folder")
    sub.add_argument("--threshold", type=float, default=0.5,
                     help="draw detections scoring at least this (default 0.5; detections.json has all)")
    sub.add_argument("--model-uri", default=None,
                     help="an MLflow model logged by the train stage: runs:/<run id>/model, "
                          "models:/ion-<config>/<version> or models:/ion-<config>@<alias> (tracking URI and Model "
                          "Registry: MLFLOW_TRACKING_URI, else the workdir's mlflow.db)")
    config_flags(sub)


# ----------------------------------------------------------------------------- the listing


def _candidates(paths: Sequence[Path]) -> Iterator[tuple[Path, str]]:
    """(file, name relative to the folder given) for every entry under `paths` that is not a
    folder (FIFOs and devices included: `_problem` skips them without opening), sorted."""
    for given in paths:
        if given.is_dir():
            for folder, dirs, files in os.walk(given):
                dirs.sort()
                for name in sorted(files):
                    path = Path(folder) / name
                    yield path, path.relative_to(given).as_posix()
        elif given.exists() or given.is_symlink():
            yield given, given.name
        else:
            raise UserError(f"--images {given}: no such file or folder")


def _problem(path: Path) -> str | None:
    """Why `path` cannot be predicted, from its type and header alone (pixels are read in the
    task), or None: not a regular file (a FIFO would block the reader forever), unreadable, not an
    image, or a header declaring more pixels than PIL decodes safely."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if not stat.S_ISREG(mode):
        return "not a regular file (a FIFO, socket or device): never opened"
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError as err:
        return f"its header declares too many pixels ({err})"
    except UnidentifiedImageError:
        return "not an image"
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    except (ValueError, SyntaxError) as err:
        return f"not a readable image ({err})"
    if width * height > MAX_PIXELS:
        return (f"its header declares {width} x {height} = {width * height / 1e6:.0f} Mpx "
                f"(at most {MAX_PIXELS / 1e6:.0f})")
    return None


def _drawn_names(relatives: Sequence[str]) -> list[str]:
    """A drawn-image name per input, all different: the relative path without its extension,
    folders joined by `__`; inputs that would share one (b.png beside b.jpg, or the same name
    in two folders given) get `-2`, `-3`, ... chosen among names no other input has (b-2.jpg
    of its own keeps `b-2`)."""
    natural = [Path(r).with_suffix("").as_posix().replace("/", "__") for r in relatives]
    counts: dict[str, int] = {}
    for name in natural:
        counts[name] = counts.get(name, 0) + 1
    taken = set(natural)
    names, first = [], set()
    for name in natural:
        if counts[name] == 1 or name not in first:
            first.add(name)
            names.append(name)
            continue
        n = 2
        while f"{name}-{n}" in taken:
            n += 1
        taken.add(f"{name}-{n}")
        names.append(f"{name}-{n}")
    return names


def list_images(paths: Sequence[Path]) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(images with their drawn-image names, [(skipped file, why)])."""
    images, skipped = [], []
    for path, relative in _candidates(paths):
        problem = _problem(path)
        if problem is None:
            images.append((path, relative))
        else:
            skipped.append((path, problem))
    names = _drawn_names([relative for _, relative in images])
    return [(path, name) for (path, _), name in zip(images, names)], skipped


def _say_skipped(skipped: Sequence[tuple[Path, str]], what: str) -> None:
    if not skipped:
        return
    shown = "; ".join(f"{path}: {why}" for path, why in skipped[:SHOWN_SKIPPED])
    more = f"; and {len(skipped) - SHOWN_SKIPPED} more" if len(skipped) > SHOWN_SKIPPED else ""
    print(f"skipped {len(skipped)} file(s) {what}: {shown}{more}", file=sys.stderr)


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
    from pipeline.tracking.model import ARTIFACT_CONFIG, ARTIFACT_MODEL_JSON, ARTIFACT_RPN, config_of, model_files
    from pipeline.tracking.registry import download_artifacts

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
    from pipeline.tracking.uri import tracking_uri_for

    images, skipped = list_images(args.images)
    _say_skipped(skipped, "that are not readable images")
    if not images:
        raise UserError(f"--images {' '.join(str(p) for p in args.images)}: no readable image there "
                        "(give JPEG/PNG files or folders holding them)")
    tracking_uri = tracking_uri_for(cfg.runtime.workdir)
    # The downloaded model lives in the workdir, not the driver's /tmp: on a cluster the workdir
    # is the shared storage every worker reads (the images and drawn results travel as bytes).
    Path(cfg.runtime.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".predict-model-", dir=cfg.runtime.workdir) as tmp:
        if args.model_uri:
            predictor, notes = _from_mlflow(args.model_uri, tracking_uri, Path(tmp))
        else:
            predictor, notes = _from_workdir(cfg, args)
        for note in notes:
            print(note, file=sys.stderr)
        out = Path(args.out)
        (out / DRAWN_DIR).mkdir(parents=True, exist_ok=True)
        cluster = Cluster(cfg.runtime, tracking_uri=tracking_uri)
        try:
            count, failed = _stream(images, predictor, args.threshold, cluster, out,
                                    chunk=max(1, cfg.runtime.num_workers * TASKS_PER_WORKER))
        finally:
            cluster.close()
    _say_skipped(failed, "that could not be read to the end")
    done = len(images) - len(failed)
    print(f"predict: {count} detections in {done} image(s) -> {out / RESULTS_FILE}; drawn (score >= "
          f"{args.threshold}) in {out / DRAWN_DIR}/" + (f"; {len(skipped) + len(failed)} file(s) skipped "
                                                         f"(named above)" if skipped or failed else ""))
    return 0


def _tasks(images: Sequence[tuple[Path, str]], start: int, predictor: Any, threshold: float,
           failed: list[tuple[Path, str]]) -> list:
    """The tasks of images[start:start + ...], each image's bytes read here, on the driver, and
    sent with the task: workers on other nodes need not see this disk."""
    from pipeline.commands.predict_images import PredictTask

    loaded = []
    for i, (path, _) in enumerate(images[start:start + IMAGES_PER_TASK], start=start):
        try:
            loaded.append((i, str(path), path.read_bytes()))
        except OSError as err:
            failed.append((path, f"cannot be read ({err.strerror})"))
    return [PredictTask(predictor=predictor, draw_threshold=threshold, images=tuple(loaded))] if loaded else []


def _stream(images: Sequence[tuple[Path, str]], predictor: Any, threshold: float, cluster: Any, out: Path, *,
            chunk: int) -> tuple[int, list[tuple[Path, str]]]:
    """Predict `images` a chunk of tasks at a time (bounded memory: each chunk's bytes are read
    when it is sent), writing the results to detections.json as they come and each drawn image
    returned by a worker under its own name. detections.json appears, complete, at the end, also
    when some images fail; returns (detections, [(failed image, why)])."""
    from pipeline.commands.predict_images import predict_task

    count, failed = 0, []
    names = {str(path): name for path, name in images}
    starts = range(0, len(images), IMAGES_PER_TASK)
    with atomic_path(out / RESULTS_FILE) as tmp, open(tmp, "w", encoding="utf-8") as f, \
            tqdm(total=len(images), desc="predict", unit="image", disable=None) as bar:
        f.write("[")
        for first in range(0, len(starts), chunk):
            tasks = [t for start in starts[first:first + chunk]
                     for t in _tasks(images, start, predictor, threshold, failed)]
            # gpu: one actor per GPU holds the models when runtime.device allows (pipeline/cluster/tasks.py).
            for entries in cluster.map(predict_task, tasks, desc="predict tasks", gpu=True):
                for entry in entries:
                    if "error" in entry:
                        failed.append((Path(entry["file_name"]), entry["error"]))
                    else:
                        with atomic_path(out / DRAWN_DIR / f"{names[entry['file_name']]}.jpg") as drawn:
                            drawn.write_bytes(entry["drawn"])
                        for result in entry["results"]:
                            f.write(("\n" if count == 0 else ",\n") + json.dumps(result, separators=(",", ":")))
                            count += 1
                    bar.update(1)
        f.write("\n]\n")
    return count, failed
