"""MLflow: one parent run per pipeline run, one nested run per variant, registry aliases.

A variant run holds its recipe as params, its measurements as metrics, its lineage, runtime,
target and Pareto verdict as tags, and its model folder as the artifact ``model/``. The parent run
holds the config, the Pareto plot and the selection report. Promotion registers the winner's
``model/`` as a model version and points the alias (``champion``) at it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import mlflow
from filelock import FileLock
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from edgeopt.artifacts import ModelArtifact
from edgeopt.evaluation import Evaluation
from edgeopt.pareto import Selection
from edgeopt.promotion import Decision


class TrackedRuns(BaseModel):
    """The MLflow runs of one pipeline run: the parent and one per variant (``variant@runtime`` -> run id),
    and the tags every one of them carries (provenance, ZenML run)."""

    parent_run_id: str
    experiment_id: str
    variant_runs: Dict[str, str]
    tags: Dict[str, str] = {}


class PromotionResult(BaseModel):
    """What ``promote`` did and why: the audit trail of one run (the version, when promoted)."""

    promoted: bool
    reason: str
    rule: str
    checks: List[str]
    champion_before: Optional[str]
    winner: Optional[str]
    registered_model: Optional[str] = None
    version: Optional[str] = None
    alias: Optional[str] = None
    variant: Optional[str] = None
    run_id: Optional[str] = None
    runtime: Optional[str] = None
    runtime_settings: Dict[str, Any] = {}
    metrics: Dict[str, float] = {}
    lineage: Dict[str, Optional[str]] = {}

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
        exp = client.get_experiment_by_name(name)
        assert exp is not None
        return exp.experiment_id


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
    decision: Decision,
    models: Dict[str, ModelArtifact],
    report_md: str,
    plot_png: Path,
    tags: Dict[str, str],
) -> TrackedRuns:
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
    parent = client.create_run(exp, run_name=run_name, tags={
        **common, "edgeopt.role": "pipeline", "winner": str(selection.winner), "promote": str(decision.promote).lower(),
        "decision": decision.reason[:5000], "promotion_rule": decision.rule, "pareto_front": ",".join(selection.front),
    })
    pid = parent.info.run_id
    params = [Param(k, v[:6000]) for k, v in _flatten(config).items()]
    for i in range(0, len(params), 100):
        client.log_batch(pid, params=params[i : i + 100])
    ref = evaluation.reference
    client.log_batch(pid, metrics=[Metric(f"reference_{k}", float(v), 0, 0)
                                   for k, v in ref.model_dump().items() if isinstance(v, (int, float))])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "selection.md").write_text(report_md)
        (Path(tmp) / "selection.json").write_text(selection.model_dump_json(indent=2))
        (Path(tmp) / "evaluation.json").write_text(evaluation.model_dump_json(indent=2))
        (Path(tmp) / "decision.json").write_text(decision.model_dump_json(indent=2))
        client.log_artifacts(pid, tmp, artifact_path="report")
    client.log_artifact(pid, str(plot_png), artifact_path="report")

    runs = {}
    champion = [evaluation.champion] if evaluation.champion is not None else []
    for r in [*evaluation.results, *champion]:
        v = verdicts.get(r.variant)
        vtags = {
            **common,
            "mlflow.parentRunId": pid,
            "edgeopt.role": "variant" if v else "champion",
            "runtime": str(r.recipe.get("runtime")),
            "base": str(r.recipe.get("base")),
            "reference": str(r.variant == evaluation.reference.variant).lower(),
            "pareto": v.status if v else "champion",
            "winner": str(r.variant == selection.winner).lower(),
            **{f"lineage.{k}": str(val) for k, val in r.lineage.items()},
            **{f"runtime.{k}": str(val) for k, val in r.runtime_settings.items()},
        }
        if v and v.reasons:
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
        model = models.get(r.variant.split("@")[0]) if v else None
        if model is not None and not model.failed:
            client.log_artifacts(rid, str(model.path), artifact_path="model")
        client.set_terminated(rid, "FINISHED" if r.ok else "FAILED")
        runs[r.variant] = rid
    client.set_terminated(pid, "FINISHED")
    log.info("track: MLflow run %s (%d variant runs) in experiment %r at %s", pid, len(runs), experiment, uri)
    return TrackedRuns(parent_run_id=pid, experiment_id=exp, variant_runs=runs, tags=tags)


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


def fetch_champion(uri: str, name: str, alias: str, dst: Path) -> Optional[Tuple[ModelArtifact, str, str]]:
    """The model behind ``alias`` as (ModelArtifact, version, runtime), or None when there is none."""
    mv = alias_version(uri, name, alias)
    if mv is None:
        return None
    model = ModelArtifact(download_version(uri, mv, dst))
    model.verify()
    return model, str(mv.version), mv.tags.get("runtime", "onnxruntime")


def promotion_lock(uri: str, name: str) -> FileLock:
    """Serializes promotions of one registered model from this machine (compare-and-set below)."""
    key = hashlib.sha256(f"{uri}|{name}".encode()).hexdigest()[:16]
    lock_dir = Path(tempfile.gettempdir()) / "edgeopt-locks"
    lock_dir.mkdir(exist_ok=True)
    return FileLock(str(lock_dir / f"promote-{key}.lock"), timeout=600)


def promote_winner(
    *, uri: str, name: str, alias: str, selection: Selection, evaluation: Evaluation, decision: Decision,
    runs: TrackedRuns, tags: Dict[str, str],
) -> PromotionResult:
    """Register the winner as a new version of ``name`` and move ``alias`` to it, if ``decision`` says so.

    Compare-and-set under a lock: if another run moved the alias since this run measured the
    champion, nothing is promoted (the comparison would be against a stale champion).
    Returns what was done and why.
    """
    measured = evaluation.champion_version
    base = PromotionResult(promoted=False, reason=decision.reason, rule=decision.rule, checks=decision.checks,
                           champion_before=measured, winner=selection.winner)
    if not decision.promote:
        log.warning("promote: nothing promoted: %s", decision.reason)
        return base
    assert selection.winner is not None  # a promotion decision has a winner
    w = evaluation.result(selection.winner)
    run_id = runs.variant_runs[selection.winner]
    with promotion_lock(uri, name):
        now = alias_version(uri, name, alias)
        now = str(now.version) if now is not None else None
        if now != measured:
            reason = (f"the champion moved from v{measured} to v{now} while this run was measuring; "
                      "not promoted (re-run to compare against the new champion)")
            log.warning("promote: %s", reason)
            return base.model_copy(update={"reason": reason})
        version = register_version(uri, name, run_id, tags={
            **tags, "variant": w.variant, "runtime": str(w.recipe["runtime"]), "rule": decision.rule,
            "decision": decision.reason, "pareto_front": ",".join(selection.front),
            **{k: f"{v:.6g}" for k, v in w.metrics.items() if k in ("accuracy", "latency_p50_ms", "size_mb")},
        }, description=decision.reason)
        set_alias(uri, name, alias, version)
    log.info("promote: %s -> %s version %s (alias %r): %s", w.variant, name, version, alias, decision.reason)
    return base.model_copy(update={
        "promoted": True, "registered_model": name, "version": str(version), "alias": alias, "variant": w.variant,
        "run_id": run_id, "runtime": str(w.recipe["runtime"]), "runtime_settings": w.runtime_settings,
        "metrics": w.metrics, "lineage": w.lineage,
    })
