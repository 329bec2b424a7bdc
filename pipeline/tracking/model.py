"""The trained detector as an MLflow model (pyfunc): what the train stage logs
(through StageContext.log_model) and `predict --model-uri` loads.

Artifacts: model.json + final.pt (the detector, stages.train.load_trained_detector),
rpn.pt (the proposals stage's RPN, for the test mix's RPN boxes) and config.yaml
(the run's full config: the mix, detect and tune settings). The tune stage logs
its thresholds into the same run's model folder, model/thresholds/best.json,
so they travel with the model; without them the untuned baseline applies.

Self-contained: the project's packages (ion, proposals, stages, pipeline) are
copied into the model's code/ folder (`code_paths`), which MLflow puts first on
sys.path when it loads the model, and requirements.txt names every distribution
inference imports. The project is not published as a package a fresh
environment could install, and the code that trained the weights is the code
that must read them: shipping it with the model keeps the two together.

    model = mlflow.pyfunc.load_model("runs:/<run id>/model")      # or models:/ion-default@champion
    model.predict(pd.DataFrame({"path": ["a.jpg", "b.png"]}))     # files on this machine
    model.predict(pd.DataFrame({"image": [open("a.jpg", "rb").read()]}))   # file bytes
    -> DataFrame: file_name, image_id, category_id, category, bbox [x, y, w, h], score, error

Served (`mlflow models serve`), the `image` column is base64 text in the JSON
request, decoded by MLflow as the signature's binary type says. image_id is the
row's index; a row that cannot be read gets one line with its error and no
detections, the other rows their detections.

Like pipeline/tracking/client.py it imports mlflow: a PythonModel must subclass
mlflow's class. Models logged before it lived here were pickled as
pipeline.mlflow_model.IonDetectorModel; pipeline/__init__.py maps that name to
this module. It is imported only where a model is logged or loaded.
"""
from __future__ import annotations

import base64
import binascii
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

ARTIFACT_MODEL_JSON = "model.json"
ARTIFACT_WEIGHTS = "final.pt"
ARTIFACT_RPN = "rpn.pt"
ARTIFACT_CONFIG = "config.yaml"
MODEL_ARTIFACT_PATH = "model"
THRESHOLDS_PATH = "thresholds/best.json"  # inside the model folder
PROJECT_PACKAGES = ("ion", "proposals", "stages", "pipeline")
COLUMNS = ["file_name", "image_id", "category_id", "category", "bbox", "score", "error"]
# What loading and predicting import (checked by tests/pipeline/test_mlflow_model.py in a
# fresh process; tqdm: mlflow.pyfunc imports it without requiring it); MLflow adds itself.
# Stated, not inferred: inferring imports the model in a subprocess, which takes seconds.
REQUIREMENTS = ("torch", "torchvision", "numpy", "pillow", "opencv-contrib-python-headless", "pyyaml", "scipy",
                "h5py", "pycocotools", "filelock", "pandas", "tqdm")


def model_files(model_root: Path) -> tuple[dict[str, Path], dict | None]:
    """({artifact name: local file}, tuned thresholds or None) of a downloaded model folder."""
    import json

    folder = Path(model_root) / "artifacts"
    files = {name: folder / name for name in (ARTIFACT_MODEL_JSON, ARTIFACT_WEIGHTS, ARTIFACT_RPN, ARTIFACT_CONFIG)
             if (folder / name).is_file()}
    thresholds = Path(model_root) / THRESHOLDS_PATH
    best = json.loads(thresholds.read_text(encoding="utf-8")) if thresholds.is_file() else None
    return files, best


def _rows(model_input: Any) -> list[tuple[str | None, Any]]:
    """(path, image bytes or base64 text) per input row; one of the two is None."""
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        columns = list(model_input.columns)
        if "path" not in columns and "image" not in columns:
            raise ValueError(f"the input has no `path` or `image` column (columns: {columns}); give a DataFrame "
                             "with either")
        paths = model_input["path"].tolist() if "path" in columns else [None] * len(model_input)
        images = model_input["image"].tolist() if "image" in columns else [None] * len(model_input)
        return [(None if _missing(p) else str(p), None if _missing(i) else i) for p, i in zip(paths, images)]
    if isinstance(model_input, (str, Path)):
        return [(str(model_input), None)]
    return [(str(p), None) for p in model_input]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # None or NaN


def _image_of(path: str | None, data: Any, row: int):
    """uint8 (H, W, 3) RGB of one input row; UserError naming the row when it is no image."""
    from ion.data.images import decode_image, load_image
    from ion.errors import UserError

    if data is None:
        if path is None:
            raise UserError(f"row {row}: neither `path` nor `image` is given")
        return load_image(path)
    if isinstance(data, str):  # base64 text (a DataFrame built by hand, not through the signature)
        try:
            data = base64.b64decode(data)  # line breaks (as `base64` writes them) are skipped
        except (binascii.Error, ValueError):
            raise UserError(f"row {row}: `image` is not base64 text of an image file") from None
    if not isinstance(data, (bytes, bytearray)):
        raise UserError(f"row {row}: `image` holds {type(data).__name__}, not the bytes of an image file")
    return decode_image(bytes(data), name=path or f"row {row} (image bytes)")


class IonDetectorModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: image paths or bytes in, detections out (pipeline/commands/predict_images.py)."""

    def load_context(self, context: Any) -> None:
        from pipeline.commands.predict_images import make_predictor

        model_root = Path(context.artifacts[ARTIFACT_MODEL_JSON]).parent.parent
        artifacts, best = model_files(model_root)
        cfg = config_of(artifacts[ARTIFACT_CONFIG])
        self.predictor, self.notes = make_predictor(cfg, model_dir=artifacts[ARTIFACT_MODEL_JSON].parent,
                                                    rpn_weights=artifacts.get(ARTIFACT_RPN), best=best)

    # A DataFrame hint: MLflow infers no schema from it (the signature states one) and does not
    # warn, on every load, that the input has no type hint.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from ion.errors import UserError
        from ion.evaluation.results import to_coco_results
        from pipeline.commands.predict_images import _models, detect_image

        _, _, _, categories = _models(self.predictor)
        rows = []
        for image_id, (path, data) in enumerate(_rows(model_input)):
            try:
                image = _image_of(path, data, image_id)
            except UserError as err:
                rows.append({**dict.fromkeys(COLUMNS), "file_name": path, "image_id": image_id, "error": str(err)})
                continue
            dets = detect_image(self.predictor, image, seed=image_id)
            for entry in to_coco_results({image_id: dets}, categories):
                rows.append({"file_name": path, **entry, "category": categories.name(entry["category_id"]),
                             "error": None})
        # object columns: an error row's missing values stay None (null in the served JSON), not NaN
        # (which turns the ids to floats and is no JSON)
        frame = pd.DataFrame(rows, columns=COLUMNS, dtype=object)
        return frame.astype({"image_id": "int64"})


def signature():
    """Input: `path` (a file on the serving machine) and/or `image` (the file's bytes), one
    of them per row; output: one row per detection (or per unreadable input)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    inputs = Schema([ColSpec(DataType.string, "path", required=False),
                     ColSpec(DataType.binary, "image", required=False)])
    outputs = Schema([ColSpec(DataType.string, "file_name", required=False), ColSpec(DataType.long, "image_id"),
                      ColSpec(DataType.long, "category_id", required=False),
                      ColSpec(DataType.string, "category", required=False),
                      ColSpec(Array(DataType.double), "bbox", required=False),
                      ColSpec(DataType.double, "score", required=False),
                      ColSpec(DataType.string, "error", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def config_of(path: Path):
    """The pipeline Config logged with the model."""
    from ion.schema import Origin, build, parse_yaml
    from pipeline.config import Config

    text = Path(path).read_text(encoding="utf-8")
    return build(Config, parse_yaml(text, str(path)), origin=Origin(label=str(path), base_dir=Path(path).parent))


def project_root() -> Path:
    """The folder holding the project's packages this process imported."""
    return Path(__file__).resolve().parents[2]


def save_detector_model(path: Path, artifacts: dict[str, Path], config_text: str) -> Path:
    """Write the pyfunc model to `path` (a new folder): the artifacts, config.yaml, the
    project's code, requirements, the signature and the MLmodel file."""
    import importlib.metadata
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / ARTIFACT_CONFIG
        config.write_text(config_text, encoding="utf-8")
        files = {name: str(p) for name, p in artifacts.items()}
        files[ARTIFACT_CONFIG] = str(config)
        code = []
        for package in PROJECT_PACKAGES:  # sources only: no caches of this machine's Python
            target = Path(tmp) / "code" / package
            shutil.copytree(project_root() / package, target,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            code.append(str(target))
        requirements = [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS if _installed(name)]
        # MLflow warns on every save that a pickled PythonModel runs code when loaded; ours is
        # a class of this project, loaded only from runs the user's own pipeline logged.
        # Nor its advice on type hints and input examples: the signature is stated (signature()).
        logger = logging.getLogger("mlflow.pyfunc")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                mlflow.pyfunc.save_model(str(path), python_model=IonDetectorModel(), artifacts=files,
                                         code_paths=code, pip_requirements=requirements, signature=signature())
        finally:
            logger.setLevel(level)
    return path


def _installed(name: str) -> bool:
    import importlib.metadata
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False
