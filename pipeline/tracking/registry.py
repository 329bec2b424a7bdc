"""The MLflow Model Registry side of the pipeline: each train output the
pipeline produces becomes one version of a registered model, `ion-<config
name>` unless the config's `registered_model` names another.

    models:/ion-default/3            version 3
    models:/ion-default@champion     whatever version the alias points at
                                     (MlflowClient().set_registered_model_alias(...))

A version's tags: cache_key (the train output's key), code_version, config,
and once evaluate has scored it test_AP / test_AP50. A cached rerun reuses the
train output and registers nothing. The Tracker (pipeline/tracking/client.py) sends
the records (op "register", "version_tags") and keeps them when the store does
not answer, like every other record; this module applies them, and downloads
a model by its runs:/ or models:/ URI (`predict --model-uri`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from ion.errors import UserError

MODEL_PREFIX = "ion-"
SOURCE_ARTIFACT = "model"  # the train run's model folder (pipeline/tracking/model.py MODEL_ARTIFACT_PATH)


def registered_model_name(cfg: Any) -> str:
    """The config's `registered_model`, else ion-<config name>."""
    return cfg.registered_model or f"{MODEL_PREFIX}{cfg.name}"


def _ensure_registered(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
        return
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
    try:
        client.create_registered_model(name, description="ION detectors trained by the pipeline's train stage; "
                                                          "tags: cache_key, code_version, test_AP")
    except MlflowException:
        client.get_registered_model(name)  # another run created it meanwhile; anything else raises here


def register_version(client: MlflowClient, *, run_id: str, name: str, tags: Mapping[str, str]) -> str:
    """A new version of `name` from run `run_id`'s model folder, unless the run already has one
    (a replayed record); its version number."""
    _ensure_registered(client, name)
    existing = versions_of_run(client, name, run_id)
    if existing:
        return existing[0].version
    version = client.create_model_version(name, source=f"runs:/{run_id}/{SOURCE_ARTIFACT}", run_id=run_id,
                                          tags=dict(tags))
    return version.version


def versions_of_run(client: MlflowClient, name: str, run_id: str) -> list:
    try:
        return list(client.search_model_versions(f"name = '{_quoted(name)}' and run_id = '{run_id}'"))
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return []
        raise


def tag_versions(client: MlflowClient, *, run_id: str, name: str, tags: Mapping[str, str]) -> int:
    """Set `tags` on the versions of `name` registered from run `run_id`; how many there were."""
    found = versions_of_run(client, name, run_id)
    for version in found:
        for key, value in tags.items():
            client.set_model_version_tag(name, version.version, key, value)
    return len(found)


def _quoted(text: str) -> str:
    return text.replace("'", "\\'")


def version_source(client: MlflowClient, uri: str) -> str:
    """Where the model of `models:/<name>/<version>` or `models:/<name>@<alias>` lives in the
    tracking store `client` reads (MLflow's own download would ask the default registry instead)."""
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    name, version = get_model_name_and_version(client, uri)
    return client.get_model_version_download_uri(name, version)


def download_artifacts(uri: str, dst: Path, *, tracking_uri: str) -> Path:
    """Download an artifact folder (`runs:/<run id>/model`, `models:/<name>/<version>`,
    `models:/<name>@<alias>`) into `dst`; UserError naming the URI. The Model Registry
    is the tracking store's."""
    import mlflow.artifacts

    Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        source = uri
        if uri.startswith("models:/"):
            source = version_source(MlflowClient(tracking_uri=tracking_uri), uri)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst),
                                                        tracking_uri=tracking_uri))
    except (MlflowException, OSError) as err:
        raise UserError(f"--model-uri {uri}: cannot download it from {tracking_uri} ({str(err)[:300]}); "
                        f"give runs:/<run id>/model of a train stage run or models:/ion-<config>/<version> "
                        f"(or @<alias>) of the Model Registry (MLFLOW_TRACKING_URI or --workdir chooses the "
                        f"store)") from None
