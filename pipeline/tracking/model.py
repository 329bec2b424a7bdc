"""The trained detector as an MLflow model (pyfunc): what the train stage logs
(through StageContext.log_model) and `predict --model-uri` loads.

Artifacts: model.json + final.pt (the detector, stages.train.load_trained_detector),
rpn.pt (the proposals stage's RPN, for the test mix's RPN boxes) and config.yaml
(the run's full config: the mix, detect and tune settings). The tune stage logs
its thresholds into the same run's model folder, model/thresholds/best.json,
so they travel with the model; without them the untuned baseline applies.

    model = mlflow.pyfunc.load_model("runs:/<run id>/model")
    model.predict(["a.jpg", "b.png"])     # or a DataFrame with a `path` column
    -> DataFrame: file_name, image_id, category_id, category, bbox [x, y, w, h], score

Like pipeline/tracking/client.py it imports mlflow: a PythonModel must subclass
mlflow's class. Models logged before it lived here were pickled as
pipeline.mlflow_model.IonDetectorModel; pipeline/__init__.py maps that name to
this module. It is imported only where a model is logged or loaded.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow.pyfunc

ARTIFACT_MODEL_JSON = "model.json"
ARTIFACT_WEIGHTS = "final.pt"
ARTIFACT_RPN = "rpn.pt"
ARTIFACT_CONFIG = "config.yaml"
MODEL_ARTIFACT_PATH = "model"
THRESHOLDS_PATH = "thresholds/best.json"  # inside the model folder


def model_files(model_root: Path) -> tuple[dict[str, Path], dict | None]:
    """({artifact name: local file}, tuned thresholds or None) of a downloaded model folder."""
    import json

    folder = Path(model_root) / "artifacts"
    files = {name: folder / name for name in (ARTIFACT_MODEL_JSON, ARTIFACT_WEIGHTS, ARTIFACT_RPN, ARTIFACT_CONFIG)
             if (folder / name).is_file()}
    thresholds = Path(model_root) / THRESHOLDS_PATH
    best = json.loads(thresholds.read_text(encoding="utf-8")) if thresholds.is_file() else None
    return files, best


def _paths(model_input: Any) -> list[str]:
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        column = "path" if "path" in model_input.columns else model_input.columns[0]
        return [str(p) for p in model_input[column].tolist()]
    if isinstance(model_input, (str, Path)):
        return [str(model_input)]
    return [str(p) for p in model_input]


class IonDetectorModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: image paths in, detections out (pipeline/commands/predict_images.py)."""

    def load_context(self, context: Any) -> None:
        from pipeline.commands.predict_images import make_predictor

        model_root = Path(context.artifacts[ARTIFACT_MODEL_JSON]).parent.parent
        artifacts, best = model_files(model_root)
        cfg = config_of(artifacts[ARTIFACT_CONFIG])
        self.predictor, self.notes = make_predictor(cfg, model_dir=artifacts[ARTIFACT_MODEL_JSON].parent,
                                                    rpn_weights=artifacts.get(ARTIFACT_RPN), best=best)

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read a schema from them
        import pandas as pd

        from ion.data.images import load_image
        from ion.evaluation.results import to_coco_results
        from pipeline.commands.predict_images import _models, detect_image

        _, _, _, categories = _models(self.predictor)
        rows = []
        for image_id, path in enumerate(_paths(model_input)):
            dets = detect_image(self.predictor, load_image(path), seed=image_id)
            for entry in to_coco_results({image_id: dets}, categories):
                rows.append({"file_name": path, **entry, "category": categories.name(entry["category_id"])})
        return pd.DataFrame(rows, columns=["file_name", "image_id", "category_id", "category", "bbox", "score"])


def config_of(path: Path):
    """The pipeline Config logged with the model."""
    from ion.schema import Origin, build, parse_yaml
    from pipeline.config import Config

    text = Path(path).read_text(encoding="utf-8")
    return build(Config, parse_yaml(text, str(path)), origin=Origin(label=str(path), base_dir=Path(path).parent))


def save_detector_model(path: Path, artifacts: dict[str, Path], config_text: str) -> Path:
    """Write the pyfunc model to `path` (a new folder): the artifacts, config.yaml, the MLmodel file."""
    import importlib.metadata
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / ARTIFACT_CONFIG
        config.write_text(config_text, encoding="utf-8")
        files = {name: str(p) for name, p in artifacts.items()}
        files[ARTIFACT_CONFIG] = str(config)
        # Stated, not inferred: inference imports the model in a subprocess, which takes seconds.
        requirements = [f"{name}=={importlib.metadata.version(name)}"
                        for name in ("torch", "torchvision", "numpy", "pillow", "opencv-contrib-python-headless")
                        if _installed(name)]
        # MLflow warns on every save that a pickled PythonModel runs code when loaded; ours is
        # a class of this project, loaded only from runs the user's own pipeline logged.
        logger = logging.getLogger("mlflow.pyfunc")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            mlflow.pyfunc.save_model(str(path), python_model=IonDetectorModel(), artifacts=files,
                                     pip_requirements=requirements)
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
