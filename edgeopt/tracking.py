"""MLflow: one parent run per pipeline run, one nested run per variant, registry aliases.

A variant run holds its recipe as params, its measurements as metrics, its lineage, runtime,
target and Pareto verdict as tags, and its model folder as the artifact ``model/``. The parent run
holds the config, the Pareto plot and the selection report. Promotion registers the winner's
``model/`` as a model version and points the alias (``champion``) at it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import mlflow
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from edgeopt.artifacts import ModelArtifact
from edgeopt.evaluation import Evaluation
from edgeopt.pareto import Selection

log = logging.getLogger(__name__)


def client_for(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # keep a local store's artifacts beside its database
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently
        return client.get_experiment_by_name(name).experiment_id


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def log_pipeline_run(
    *,
    uri: str,
    experiment: str,
    run_name: str,
    config: Dict[str, Any],
    evaluation: Evaluation,
    selection: Selection,
    models: Dict[str, ModelArtifact],
    report_md: str,
    plot_png: Path,
    tags: Dict[str, str],
) -> Dict[str, Any]:
    """Log the parent run and a nested run per variant; returns their run ids."""
    client = client_for(uri)
    exp = experiment_id(client, experiment, uri)
    verdicts = {v.variant: v for v in selection.verdicts}
    fp = evaluation.fingerprint
    common = {
        "target": evaluation.target["name"],
        "cpu": str(fp["cpu"]),
        "cpu_fingerprint": str(fp["id"]),
        "cpu_isa": ",".join(fp["isa"]),
        **tags,
    }
    parent = client.create_run(exp, run_name=run_name, tags={**common, "edgeopt.role": "pipeline"})
    pid = parent.info.run_id
    params = [Param(k, v[:6000]) for k, v in _flatten(config).items()]
    for i in range(0, len(params), 100):
        client.log_batch(pid, params=params[i : i + 100])
    t = evaluation.teacher
    client.log_batch(pid, metrics=[Metric(f"teacher_{k}", float(v), 0, 0) for k, v in t.items()])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "selection.md").write_text(report_md)
        (Path(tmp) / "selection.json").write_text(selection.model_dump_json(indent=2))
        (Path(tmp) / "evaluation.json").write_text(evaluation.model_dump_json(indent=2))
        client.log_artifacts(pid, tmp, artifact_path="report")
    client.log_artifact(pid, str(plot_png), artifact_path="report")

    runs = {}
    for r in evaluation.results:
        v = verdicts[r.variant]
        vtags = {
            **common,
            "mlflow.parentRunId": pid,
            "edgeopt.role": "variant",
            "runtime": str(r.recipe.get("runtime")),
            "pareto": v.status,
            "winner": str(r.variant == selection.winner).lower(),
            **{f"lineage.{k}": str(val) for k, val in r.lineage.items()},
            **{f"runtime.{k}": str(val) for k, val in r.runtime_settings.items()},
        }
        if v.reasons:
            vtags["verdict_reasons"] = "; ".join(v.reasons)[:5000]
        if r.reason:
            vtags["failure_reason"] = r.reason[:5000]
        run = client.create_run(exp, run_name=r.variant, tags=vtags)
        rid = run.info.run_id
        client.log_batch(
            rid,
            params=[Param(k, str(val)) for k, val in r.recipe.items()],
            metrics=[Metric(k, float(val), 0, 0) for k, val in r.metrics.items()],
        )
        model = models.get(r.variant.split("@")[0])
        if model is not None and not model.failed:
            client.log_artifacts(rid, str(model.path), artifact_path="model")
        client.set_terminated(rid, "FINISHED" if r.ok else "FAILED")
        runs[r.variant] = rid
    client.set_terminated(pid, "FINISHED")
    log.info("track: MLflow run %s (%d variant runs) in experiment %r at %s", pid, len(runs), experiment, uri)
    return {"parent_run_id": pid, "experiment_id": exp, "variant_runs": runs}


def register_version(uri: str, name: str, run_id: str, tags: Dict[str, str], description: str = "") -> str:
    """Register ``runs:/<run_id>/model`` as a new version of ``name``; returns the version number."""
    client = client_for(uri)
    try:
        client.create_registered_model(name, description="edgeopt: the Pareto-best edge model per run")
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags, description=description)
    return str(mv.version)


def set_alias(uri: str, name: str, alias: str, version: str) -> None:
    client_for(uri).set_registered_model_alias(name, alias, version)


def alias_version(uri: str, name: str, alias: str) -> Optional[Any]:
    """The model version behind ``alias``, or None when the model or the alias does not exist."""
    try:
        return client_for(uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def download_version(uri: str, mv, dst: Path) -> Path:
    """Download a model version's files (the variant's ``model/`` folder) into ``dst``."""
    mlflow.set_tracking_uri(uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dst)))


def promote_winner(
    *, uri: str, name: str, alias: str, selection: Selection, evaluation: Evaluation,
    runs: Dict[str, Any], tags: Dict[str, str],
) -> Dict[str, Any]:
    """Register the winner's model as a new version of ``name`` and move ``alias`` to it.

    Returns what was done, with the reason; no winner means no promotion (and says why).
    """
    if selection.winner is None:
        log.warning("promote: nothing promoted: %s", selection.reason)
        return {"promoted": False, "reason": selection.reason}
    w = evaluation.result(selection.winner)
    run_id = runs["variant_runs"][selection.winner]
    version = register_version(uri, name, run_id, tags={
        **tags, "variant": w.variant, "runtime": str(w.recipe["runtime"]),
        **{k: f"{v:.6g}" for k, v in w.metrics.items() if k in ("accuracy", "latency_p50_ms", "size_mb")},
    }, description=selection.reason)
    set_alias(uri, name, alias, version)
    log.info("promote: %s -> %s version %s (alias %r)", w.variant, name, version, alias)
    return {
        "promoted": True, "reason": selection.reason, "registered_model": name, "version": version,
        "alias": alias, "variant": w.variant, "run_id": run_id, "runtime": w.recipe["runtime"],
        "runtime_settings": w.runtime_settings, "metrics": w.metrics, "lineage": w.lineage,
    }
