"""MLflow: one parent run per pipeline run, one nested run per variant.

A variant run holds its recipe as params, its measurements as metrics, its lineage, runtime,
target and Pareto verdict as tags, its model folder as the artifact ``model/`` and what a bundle
needs besides the model as ``serving/serving.json``; the same folder is an MLflow 3 LoggedModel of
that run (the ONNX flavor for an ONNX file, the files alone for OpenVINO IR) with the run's metrics
linked to it and to the dataset, so the experiment's Models tab compares the variants. Every run
carries MLflow's source tags and the dataset (name, the data hash as digest, source) as its input.
The parent run holds the config, the Pareto plot and the selection report. Registering the winner
and moving the alias is ``edgeopt.registry``'s.
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
from typing import Any, Callable, Dict

import mlflow
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.numpy_dataset import NumpyDataset, from_numpy
from mlflow.entities import Dataset as MlflowDataset
from mlflow.entities import DatasetInput, InputTag, LoggedModelOutput, Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT
from pydantic import BaseModel

from edgeopt.artifacts import Dataset, ModelArtifact
from edgeopt.measure.evaluate import Evaluation
from edgeopt.select.pareto import Selection
from edgeopt.select.promotion import Decision
from edgeopt.track.uri import client_for, experiment_id, redact_uri

SERVING_FILE = "serving/serving.json"  # in a variant's run: labels, output kind and preprocessing, for its bundles


class TrackedRuns(BaseModel):
    """The MLflow runs of one pipeline run: the parent and one per variant (``variant@runtime`` -> run id),
    the LoggedModel of each variant that built, and the tags every run carries (provenance, ZenML run)."""

    parent_run_id: str
    experiment_id: str
    variant_runs: Dict[str, str]
    tags: Dict[str, str] = {}
    variant_models: Dict[str, str] = {}  # ``variant@runtime`` -> the id of its MLflow LoggedModel (``models:/<id>``)


log = logging.getLogger(__name__)


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
# view's state (sort, columns, grouping), opened by ?viewStateShareKey=<key> (the link in docs/operating.md).
# MLflow has no other way to choose what a new user sees, and a view cannot expand nested runs:
# grouping by the pipeline run (tag pipeline_run) lists its variant runs flat, under one heading.
VIEW_KEY = "edgeopt"
VIEW_METRICS = ("accuracy", "accuracy_drop", "test_accuracy", "latency_p50_ms", "size_mb")


def set_runs_view(client: MlflowClient, experiment: str) -> None:
    """The experiment's ``edgeopt`` view: the runs of each pipeline run under one heading, newest
    first, with the metrics that decide a variant and its Pareto verdict as columns."""
    columns = [*(f"attributes.`{a}`" for a in ("Source", "Models", "Dataset")),
               *(f"metrics.`{m}`" for m in VIEW_METRICS), "tags.`pareto`"]
    client.set_experiment_tag(experiment, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps({
        "orderByKey": "attributes.start_time", "orderByAsc": False, "selectedColumns": columns,
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "pipeline_run"}]},
    }))


# config fields that may hold a URL with a password (the tracking store, the search's study storage)
CREDENTIAL_FIELDS = ("tracking.uri", "variants.search.storage")


def config_params(config: Dict[str, Any]) -> Dict[str, str]:
    """The run config flattened to MLflow params, any credential in a URL field replaced by ``***``."""
    return {k: redact_uri(v) if k in CREDENTIAL_FIELDS else v for k, v in _flatten(config).items()}


def serving_info(dataset_manifest: Dict[str, Any], output: str = "logits") -> Dict[str, Any]:
    """What a bundle needs besides the model, from the dataset the model was trained and measured on: its
    labels, and its preprocessing, ``resize`` included (a centre crop is served as it was evaluated)."""
    pre = {k: dataset_manifest[k] for k in ("input_shape", "mean", "std", "scale")}
    return {"labels": list(dataset_manifest["classes"]), "output": output,
            "preprocessing": {**pre, "resize": dataset_manifest.get("resize", {"mode": "stretch"})}}


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
    params = [Param(k, v[:6000]) for k, v in config_params(config).items()]
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
