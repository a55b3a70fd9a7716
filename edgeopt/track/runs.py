"""MLflow: one parent run per pipeline run, one nested run per variant, registry aliases.

A variant run holds its recipe as params, its measurements as metrics, its lineage, runtime,
target and Pareto verdict as tags, and its model folder as the artifact ``model/``; the same folder
is an MLflow 3 LoggedModel of that run (the ONNX flavor for an ONNX file, the files alone for
OpenVINO IR) with the run's metrics linked to it and to the dataset, so the experiment's Models tab
compares the variants. Every run carries MLflow's source tags and the dataset (name, the data hash
as digest, source) as its input. The parent run holds the config, the Pareto plot and the selection
report. Promotion registers the winner's ``model/`` as a model version and points the alias
(``champion``) at it.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
import warnings
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import unquote

import mlflow
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.numpy_dataset import NumpyDataset, from_numpy
from mlflow.entities import Dataset as MlflowDataset
from mlflow.entities import DatasetInput, InputTag, LoggedModelOutput, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT
from pydantic import BaseModel

from edgeopt.artifacts import Dataset, ModelArtifact
from edgeopt.deploy.bundles import model_sha256, serving_info
from edgeopt.measure.evaluate import Evaluation
from edgeopt.registry.lease import LEASE_SECONDS, SERVING_FILE, Lease, blocked, run_model_manifest
from edgeopt.select.pareto import Selection
from edgeopt.select.promotion import Decision


class TrackedRuns(BaseModel):
    """The MLflow runs of one pipeline run: the parent and one per variant (``variant@runtime`` -> run id),
    the LoggedModel of each variant that built, and the tags every run carries (provenance, ZenML run)."""

    parent_run_id: str
    experiment_id: str
    variant_runs: Dict[str, str]
    tags: Dict[str, str] = {}
    variant_models: Dict[str, str] = {}  # ``variant@runtime`` -> the id of its MLflow LoggedModel (``models:/<id>``)


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


DIGEST_CHARS = 12  # of the data hash: the dataset's digest in MLflow (as the load_data log line shows it)
_MODEL_NAME_BAD = re.compile(r"[/:.%\"']")  # characters MLflow refuses in a LoggedModel name


def source_tags(tags: Dict[str, str]) -> Dict[str, str]:
    """MLflow's source tags, as ``mlflow.start_run`` sets them (user, entry point and its type, git
    when found), with the commit from ``tags['git_commit']`` when the entry point is not in a checkout."""
    out = {k: v for k, v in resolve_tags().items() if k.startswith("mlflow.")}
    commit = tags.get("git_commit", "unknown").removesuffix("-dirty")
    if MLFLOW_GIT_COMMIT not in out and commit != "unknown":
        out[MLFLOW_GIT_COMMIT] = commit
    return out


def dataset_for_mlflow(dataset: Dataset) -> NumpyDataset:
    """The dataset as MLflow shows it: its name, the data hash as digest, its source (the image folder,
    or scikit-learn's digits), and the test split's schema and profile (the split the metrics are on)."""
    m = dataset.manifest
    if m.get("root"):
        name = Path(m["root"]).name
        with warnings.catch_warnings():  # MLflow registers its local-file source twice ('' and 'file' schemes)
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
            source = resolve_dataset_source(Path(m["root"]).resolve().as_uri())
    else:
        name, source = m["source"], CodeDatasetSource({"mlflow.source.name": f"sklearn.datasets.load_{m['source']}"})
    return from_numpy(dataset.raw("test"), source=source, targets=dataset.labels("test"), name=name,
                      digest=dataset.data_hash[:DIGEST_CHARS])


def _log_onnx_flavor(model: ModelArtifact, model_id: str, run_id: str) -> None:
    import onnx  # only the ONNX flavor needs it

    mlflow.onnx.log_model(onnx.load(str(model.model_file)), model_id=model_id, run_id=run_id, save_as_external_data=False,
                          pip_requirements=[f"onnxruntime=={installed_version('onnxruntime')}"])


# The MLflow flavor of a format, where MLflow has one: it writes MLmodel (loadable with
# mlflow.pyfunc.load_model) and links the model to its run. Other formats are their files alone.
MLFLOW_FLAVORS: Dict[str, Callable[[ModelArtifact, str, str], None]] = {"onnx": _log_onnx_flavor}


def log_variant_model(client: MlflowClient, experiment: str, run_id: str, name: str, model: ModelArtifact,
                      params: Dict[str, str], tags: Dict[str, str]) -> str:
    """The variant's model folder as an MLflow LoggedModel of ``run_id`` (READY); returns its id.

    Its artifacts are the folder itself (manifest + model files, byte for byte), plus MLflow's
    flavor files (MLmodel, requirements) where the format has a flavor."""
    logged = client.create_logged_model(experiment, name=_MODEL_NAME_BAD.sub("_", name), source_run_id=run_id,
                                        tags=tags, params=params, model_type=f"edgeopt-{model.format}")
    flavor = MLFLOW_FLAVORS.get(model.format)
    if flavor is not None:
        flavor(model, logged.model_id, run_id)  # the flavor writes its own copy of the model file...
    else:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    client.log_model_artifacts(logged.model_id, str(model.path))  # ...which the variant's own bytes replace
    client.finalize_logged_model(logged.model_id, "READY")
    return logged.model_id


# MLflow's shared views of the runs table: an experiment tag mlflow.sharedViewState.<key> holding the
# view's state (sort, columns, grouping), opened by ?viewStateShareKey=<key> (the README's link).
# MLflow has no other way to choose what a new user sees, and a view cannot expand nested runs:
# grouping by the pipeline run (tag pipeline_run) lists its variant runs flat, under one heading.
VIEW_KEY = "edgeopt"
VIEW_METRICS = ("accuracy", "accuracy_drop", "latency_p50_ms", "size_mb")


def set_runs_view(client: MlflowClient, experiment: str) -> None:
    """The experiment's ``edgeopt`` view: the runs of each pipeline run under one heading, newest
    first, with the metrics that decide a variant and its Pareto verdict as columns."""
    columns = [*(f"attributes.`{a}`" for a in ("Source", "Models", "Dataset")),
               *(f"metrics.`{m}`" for m in VIEW_METRICS), "tags.`pareto`"]
    client.set_experiment_tag(experiment, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps({
        "orderByKey": "attributes.start_time", "orderByAsc": False, "selectedColumns": columns,
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "pipeline_run"}]},
    }))


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
    dataset: Dataset,
    report_md: str,
    plot_png: Path,
    tags: Dict[str, str],
) -> TrackedRuns:
    """Log the parent run and a nested run per variant (each with its LoggedModel); returns their ids."""
    mlflow.set_tracking_uri(uri)  # the flavors' log_model reads the global URI
    client = client_for(uri)
    exp = experiment_id(client, experiment, uri)
    verdicts = {v.variant: v for v in selection.verdicts}
    fp = evaluation.fingerprint
    common = {
        "target": evaluation.target["name"],
        "cpu": str(fp["cpu"]),
        "cpu_fingerprint": str(fp["id"]),
        "cpu_isa": ",".join(fp["isa"]),
        "pipeline_run": run_name,
        **tags,
    }
    source = source_tags(tags)
    data = dataset_for_mlflow(dataset)
    data_input = [DatasetInput(MlflowDataset(**data.to_dict()), [InputTag(MLFLOW_DATASET_CONTEXT, "test")])]
    parent = client.create_run(exp, run_name=run_name, tags={
        **source, **common, "edgeopt.role": "pipeline", "winner": str(selection.winner),
        "promote": str(decision.promote).lower(), "decision": decision.reason[:5000], "promotion_rule": decision.rule,
        "pareto_front": ",".join(selection.front),
    })
    pid = parent.info.run_id
    client.log_inputs(pid, data_input)
    params = [Param(k, (redact_uri(v) if k == "tracking.uri" else v)[:6000]) for k, v in _flatten(config).items()]
    for i in range(0, len(params), 100):
        client.log_batch(pid, params=params[i : i + 100])
    ref = evaluation.reference
    now = int(time.time() * 1000)
    client.log_batch(pid, metrics=[Metric(f"reference_{k}", float(v), now, 0)
                                   for k, v in ref.model_dump().items() if isinstance(v, (int, float))])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "selection.md").write_text(report_md)
        (Path(tmp) / "selection.json").write_text(selection.model_dump_json(indent=2))
        (Path(tmp) / "evaluation.json").write_text(evaluation.model_dump_json(indent=2))
        (Path(tmp) / "decision.json").write_text(decision.model_dump_json(indent=2))
        client.log_artifacts(pid, tmp, artifact_path="report")
    client.log_artifact(pid, str(plot_png), artifact_path="report")

    runs, model_ids = {}, {}
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
        run = client.create_run(exp, run_name=r.variant, tags={**source, **vtags})
        rid = run.info.run_id
        recipe = {k: str(val) for k, val in r.recipe.items()}
        client.log_batch(rid, params=[Param(k, val) for k, val in recipe.items()])
        client.log_inputs(rid, data_input)
        model = models.get(r.variant.split("@")[0]) if v else None
        model_id = None
        if model is not None and not model.failed:
            client.log_artifacts(rid, str(model.path), artifact_path="model")
            client.log_dict(rid, serving_info(dataset.manifest, model.manifest.get("output", "logits")), SERVING_FILE)
            model_id = model_ids[r.variant] = log_variant_model(
                client, exp, rid, r.variant, model, recipe,
                {**source, **{k: vtags[k] for k in ("runtime", "base", "reference", "pareto", "winner")}})
        now = int(time.time() * 1000)
        first = [k for k in VIEW_METRICS if k in r.metrics]  # the Models tab shows them in this order
        client.log_batch(rid, metrics=[Metric(k, float(r.metrics[k]), now, 0, model_id=model_id, dataset_name=data.name,
                                              dataset_digest=data.digest)
                                       for k in [*first, *(k for k in r.metrics if k not in first)]])
        client.set_terminated(rid, "FINISHED" if r.ok else "FAILED")
        runs[r.variant] = rid
    client.set_terminated(pid, "FINISHED")
    set_runs_view(client, exp)
    log.info("track: MLflow run %s (%d variant runs, %d logged models) in experiment %r at %s",
             pid, len(runs), len(model_ids), experiment, redact_uri(uri))
    return TrackedRuns(parent_run_id=pid, experiment_id=exp, variant_runs=runs, tags=tags, variant_models=model_ids)


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


_SECRET_QUERY = re.compile(r"(?i)([?&][^=&]*(?:pass|token|secret|key)[^=&]*=)[^&]*")


def redact_uri(uri: str) -> str:
    """``uri`` with its user-info and secret-looking query values replaced by ``***``, for params,
    tags and logs (``http://alice:pw@host:5000`` -> ``http://***@host:5000``)."""
    scheme, sep, rest = uri.partition("://")
    if sep:
        netloc, slash, path = rest.partition("/")
        if "@" in netloc:
            rest = "***@" + netloc.rpartition("@")[2] + slash + path
    return _SECRET_QUERY.sub(r"\1***", f"{scheme}{sep}{rest}")


# Where the clients read a user name and password when the URI does not carry them: MLflow's HTTP
# client, and libpq for a PostgreSQL store.
_CREDENTIAL_ENV = {"http": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
                   "https": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
                   "postgresql": ("PGUSER", "PGPASSWORD")}


def split_credentials(uri: str) -> Tuple[str, Dict[str, str]]:
    """``uri`` without its user-info, and the environment variables that carry it instead, for the
    schemes whose clients read them (``http://alice:pw@host`` -> ``http://host`` and
    MLFLOW_TRACKING_USERNAME/PASSWORD): what is passed on as a pipeline parameter then holds no secret."""
    scheme, sep, rest = uri.partition("://")
    netloc, slash, path = rest.partition("/")
    env_names = _CREDENTIAL_ENV.get(scheme.split("+")[0].lower())
    if not sep or "@" not in netloc or env_names is None:
        return uri, {}
    userinfo, _, host = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    env = {env_names[0]: unquote(user), **({env_names[1]: unquote(password)} if password else {})}
    return f"{scheme}{sep}{host}{slash}{path}", env


def fetch_champion(uri: str, name: str, alias: str, dst: Path) -> Optional[Tuple[ModelArtifact, str, str]]:
    """The model behind ``alias`` as (ModelArtifact, version, runtime), or None when there is none."""
    mv = alias_version(uri, name, alias)
    if mv is None:
        return None
    model = ModelArtifact(download_version(uri, mv, dst))
    model.verify()
    return model, str(mv.version), mv.tags.get("runtime", "onnxruntime")


def promote_winner(
    *, uri: str, name: str, alias: str, selection: Selection, evaluation: Evaluation, decision: Decision,
    runs: TrackedRuns, tags: Dict[str, str], lease_seconds: float = LEASE_SECONDS,
) -> PromotionResult:
    """Register the winner as a new version of ``name`` and move ``alias`` to it, if ``decision`` says so.

    Compare-and-set under the registry's promotion lease (``edgeopt.registry.lease.Lease``, exclusive
    across hosts that share only the tracking URI): if another run moved the alias since this run
    measured the champion, nothing is promoted (the comparison would be against a stale champion);
    a model that was rolled back (by sha256) is not promoted until ``run.py unblock`` clears it.
    The winner's run must hold ``serving/serving.json`` (labels, preprocessing; logged by
    :func:`log_pipeline_run`): every deployment of the version reads it from there.
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
    sha = model_sha256(run_model_manifest(uri, run_id)["files"])
    if not client_for(uri).list_artifacts(run_id, SERVING_FILE.split("/")[0]):
        reason = f"{w.variant}: its run {run_id} has no {SERVING_FILE} (labels, preprocessing); not promoted"
        log.warning("promote: %s", reason)
        return base.model_copy(update={"reason": reason})
    with Lease(uri, name, ttl=lease_seconds) as lease:
        current = alias_version(uri, name, alias)
        now = str(current.version) if current is not None else None
        if now != measured:
            reason = (f"the champion moved from v{measured} to v{now} while this run was measuring; "
                      "not promoted (re-run to compare against the new champion)")
            log.warning("promote: %s", reason)
            return base.model_copy(update={"reason": reason})
        note = blocked(uri, name).get(sha)
        if note is not None:
            reason = (f"{w.variant} is the model {note} (model sha256 {sha[:12]}); not promoted until "
                      f"`python run.py unblock -c <config> --model {sha[:12]}`")
            log.warning("promote: %s", reason)
            return base.model_copy(update={"reason": reason})
        if current is not None and current.tags.get("model_sha256") == sha \
                and current.tags.get("runtime") == str(w.recipe["runtime"]):
            reason = (f"{w.variant} is the champion v{now}'s own model (model sha256 {sha[:12]}) on the same "
                      "runtime; nothing new to promote")
            log.info("promote: %s", reason)
            return base.model_copy(update={"reason": reason})
        lease.check()
        version = register_version(uri, name, run_id, tags={
            **tags, "variant": w.variant, "runtime": str(w.recipe["runtime"]), "rule": decision.rule,
            "decision": decision.reason, "pareto_front": ",".join(selection.front), "model_sha256": sha,
            **{k: f"{v:.6g}" for k, v in w.metrics.items() if k in ("accuracy", "latency_p50_ms", "size_mb")},
        }, description=decision.reason, model_id=runs.variant_models.get(selection.winner))
        lease.check()
        set_alias(uri, name, alias, version)
    log.info("promote: %s -> %s version %s (alias %r): %s", w.variant, name, version, alias, decision.reason)
    return base.model_copy(update={
        "promoted": True, "registered_model": name, "version": str(version), "alias": alias, "variant": w.variant,
        "run_id": run_id, "runtime": str(w.recipe["runtime"]), "runtime_settings": w.runtime_settings,
        "metrics": w.metrics, "lineage": w.lineage,
    })


def log_target_metrics(uri: str, runs: TrackedRuns, evaluation: Evaluation, selection: Selection) -> None:
    """One target device's measurements on the variant runs, as metrics ``<label>.<metric>``
    (``rpi4.latency_p50_ms``), with the device's fingerprint, CPU, Pareto verdict and failure reason as
    tags ``device.<label>.*``; the device's winner and fingerprint as tags of the parent run."""
    from mlflow.entities import RunTag

    client = client_for(uri)
    label, fp = evaluation.label, evaluation.fingerprint
    device = {f"device.{label}.fingerprint": str(fp["id"]), f"device.{label}.cpu": str(fp["cpu"])[:5000]}
    verdicts = {v.variant: v.status for v in selection.verdicts}
    for r in evaluation.results:
        rid = runs.variant_runs.get(r.variant)
        if rid is None:
            continue
        tags = {**device, f"device.{label}.pareto": verdicts.get(r.variant, "failed"),
                **({f"device.{label}.failure_reason": r.reason[:5000]} if r.reason else {})}
        client.log_batch(rid, metrics=[Metric(f"{label}.{k}", float(v), 0, 0) for k, v in r.metrics.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
    parent = {**device, f"device.{label}.winner": str(selection.winner),
              **({f"device.{label}.error": evaluation.error[:5000]} if evaluation.error else {})}
    client.log_batch(runs.parent_run_id, tags=[RunTag(k, v) for k, v in parent.items()])
    log.info("track: %s (fingerprint %s): %d variant runs, winner %s", label, fp["id"], len(evaluation.results),
             selection.winner)
