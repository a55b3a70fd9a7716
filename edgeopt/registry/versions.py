"""Model versions and aliases in the MLflow registry, and what a version's own run logged: its
model folder's manifest (the sha256 of its model files) and its serving info (labels, preprocessing)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import mlflow
from mlflow.exceptions import MlflowException

from edgeopt.artifacts import ModelArtifact, model_sha256
from edgeopt.track.runs import SERVING_FILE
from edgeopt.track.uri import client_for


def register_version(uri: str, name: str, run_id: str, tags: Dict[str, str], description: str = "",
                     model_id: Optional[str] = None) -> str:
    """Register the variant's model as a new version of ``name``: its LoggedModel (``models:/<id>``,
    linked, so the Models tab and the registry point at each other) or, without one, the run's
    ``model/`` folder. Both hold the same files. Returns the version number."""
    client = client_for(uri)
    try:
        client.create_registered_model(name, description="edgeopt: the Pareto-best edge model per run")
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    source = f"models:/{model_id}" if model_id else f"{client.get_run(run_id).info.artifact_uri}/model"
    mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags, description=description,
                                     model_id=model_id)
    return str(mv.version)


def set_alias(uri: str, name: str, alias: str, version: str) -> None:
    client_for(uri).set_registered_model_alias(name, alias, version)


def alias_version(uri: str, name: str, alias: str) -> Optional[Any]:
    """The model version behind ``alias``, or None when the model or the alias does not exist
    (any other error, e.g. an unreachable server, is raised: "no champion" must mean none)."""
    try:
        return client_for(uri).get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if str(err.error_code) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def download_version(uri: str, mv, dst: Path) -> Path:
    """Download a model version's files (the variant's ``model/`` folder) into ``dst``."""
    mlflow.set_tracking_uri(uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dst)))


def fetch_champion(uri: str, name: str, alias: str, dst: Path) -> Optional[Tuple[ModelArtifact, str, str]]:
    """The model behind ``alias`` as (ModelArtifact, version, runtime), or None when there is none."""
    mv = alias_version(uri, name, alias)
    if mv is None:
        return None
    model = ModelArtifact(download_version(uri, mv, dst))
    model.verify()
    return model, str(mv.version), mv.tags.get("runtime", "onnxruntime")


# ------------------------------------------------------------------------------- what a run logged


def run_model_manifest(uri: str, run_id: str) -> Dict:
    """The manifest of the model folder a run logged as ``model/`` (its files' sha256, output kind)."""
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client_for(uri).download_artifacts(run_id, "model/manifest.json", tmp)).read_text())


def run_model_sha256(uri: str, run_id: str) -> str:
    """The sha256 of the model files a run logged as ``model/``."""
    return model_sha256(run_model_manifest(uri, run_id)["files"])


def load_serving(uri: str, run_id: str, version: str) -> Dict:
    """The labels and preprocessing logged with a version's own run (never the current run's data)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client_for(uri).download_artifacts(run_id, SERVING_FILE, tmp)
        except (MlflowException, OSError):
            raise LookupError(f"v{version}: its run {run_id} has no {SERVING_FILE} (registered by an older edgeopt); "
                              "promote a new version") from None
        return json.loads(Path(path).read_text())
