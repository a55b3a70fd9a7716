"""The compress pipeline through a team's stack (infra/team/): PostgreSQL behind `mlflow server`, an S3
object store (moto's server) behind MLflow's artifacts and ZenML's artifact store, a ZenML server with
the stack `edgeopt_team`. Every run is `run.py run` in a process of its own, as a "host": its own state
dir, temp dir, ZenML client config and deploy root; only the servers are shared, and no host holds S3
credentials (MLflow proxies its artifacts; ZenML's artifact store reads its ZenML secret).
"""

import concurrent.futures
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import httpx2 as httpx
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from sklearn.datasets import load_digits

from bench.serve_load import running_server
from edgeopt.config import PROJECT_ROOT
from edgeopt.registry.versions import download_version
from infra.team.stack import BUCKET, STACK, ZENML_USER, TeamStack
from tests._search import check_two_workers_run_disjoint_trials, search_config, trials_of

pytestmark = pytest.mark.slow

ALIAS = "champion"


def team_config(stack: TeamStack, registry: str, deploy_root: Path) -> dict:
    """configs/default.yaml (digits) with short training and three variants, on the team's MLflow."""
    config = yaml.safe_load((PROJECT_ROOT / "configs" / "default.yaml").read_text())
    config.update({
        "name": "team",
        "teacher": {**config["teacher"], "width": 16, "epochs": 4},
        "student": {**config["student"], "width": 8, "epochs": 6},
        "variants": {"bases": ["student"], "quantization": ["fp32", "int8"], "formats": ["onnx"],
                     "runtimes": ["onnxruntime"], "quant": {"calibration_samples": 64}},
        "target": {**config["target"], "warmup": 5, "iterations": 30,
                   "constraints": {"max_accuracy_drop": 10.0, "max_size_mb": 1.0}},
        # a re-run of the same models is never 50 % faster: the cached run keeps the champion, whatever
        # the noise of a busy machine (the default 5 % is within it)
        "promotion": {"min_latency_gain_pct": 50.0},
        "registry": {"name": registry, "alias": ALIAS},
        "tracking": {"uri": stack.mlflow_uri, "experiment": "team"},
        "deploy": {"root": str(deploy_root), "keep": 3},
    })
    return config


class Host:
    """A machine of the team: everything of its own but the servers."""

    def __init__(self, stack: TeamStack, root: Path, zenml_server: bool = True):
        self.root, self.deploy = root, root / "deploy"
        (root / "tmp").mkdir(parents=True)
        # without the ZenML server: an embedded ZenML store of its own (the servers are MLflow's alone)
        env = stack.client_env(root / "zenml") if zenml_server else {
            **{k: v for k, v in os.environ.items() if not k.startswith("ZENML_")}, "ZENML_CONFIG_PATH": str(root / "zenml")}
        self.env = {k: v for k, v in env.items() if not k.startswith(("AWS_", "MLFLOW_TRACKING_", "PG"))}
        self.env.update({"EDGEOPT_STATE_DIR": str(root / "state"), "TMPDIR": str(root / "tmp"),
                         "EDGEOPT_TRIGGER": "ci"})

    def run(self, config: dict, run_name: str, *args: str) -> subprocess.Popen:
        path = self.root / f"{run_name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return subprocess.Popen([sys.executable, str(PROJECT_ROOT / "run.py"), "run", "-c", str(path),
                                 "--run-name", run_name, *args], cwd=PROJECT_ROOT, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-6000:]
    return out


class ZenMLApi:
    """The ZenML server's REST API, logged in as the team's user."""

    def __init__(self, stack: TeamStack):
        self.url = stack.zenml_url
        token = httpx.post(f"{self.url}/api/v1/login",
                           data={"username": ZENML_USER, "password": stack.zenml_password}).json()["access_token"]
        self.headers = {"Authorization": f"Bearer {token}"}

    def get(self, path: str, **params) -> dict:
        r = httpx.get(f"{self.url}/api/v1/{path}", headers=self.headers, params={"size": 200, **params})
        r.raise_for_status()
        return r.json()

    def run(self, name: str) -> dict:
        (run,) = self.get("runs", name=name, hydrate=True)["items"]
        return run

    def steps(self, name: str) -> dict:
        return {s["name"]: s["body"]["status"] for s in self.get("steps", pipeline_run_id=self.run(name)["id"])["items"]}


@pytest.fixture(scope="module")
def host_a(stack, tmp_path_factory):
    return Host(stack, tmp_path_factory.mktemp("host-a"))


@pytest.fixture(scope="module")
def first_runs(stack, host_a):
    """The pipeline end to end, then again with the same config (cached)."""
    config = team_config(stack, "team-digits", host_a.deploy)
    first = finish(host_a.run(config, "team-first"))
    again = finish(host_a.run(config, "team-again"))
    return {"config": config, "first": first, "again": again}


def _s3(stack: TeamStack):
    return boto3.client("s3", endpoint_url=stack.s3_url, aws_access_key_id=stack.s3_key,
                        aws_secret_access_key=stack.s3_secret, region_name="us-east-1")


def _s3_keys(stack: TeamStack, prefix: str) -> list:
    pages = _s3(stack).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _current_version(deploy_root: Path) -> dict:
    return json.loads(((deploy_root / "current").resolve() / "manifest.json").read_text())


def test_pipeline_runs_through_the_team_stack_then_cached(stack, first_runs):
    api = ZenMLApi(stack)
    first, again = api.steps("team-first"), api.steps("team-again")
    assert set(first.values()) == {"completed"}, first
    assert api.run("team-first")["resources"]["stack"]["name"] == STACK
    # the second run reuses every model from the server's cache (artifacts in S3); the data is
    # re-hashed and the measuring, tracking and promotion steps always run
    built = {"train_teacher", "distill_student", "export_teacher_onnx", "export_student_onnx",
             "quantize_student_onnx_int8"}
    assert {s for s, status in again.items() if status == "cached"} == built, again
    assert {again[s] for s in ("load_data", "evaluate", "select", "track", "promote", "deploy")} == {"completed"}
    # ZenML's artifacts are in the object store, under the stack's artifact store path
    zenml_keys = _s3_keys(stack, "zenml/")
    assert any(k.startswith("zenml/train_teacher/") for k in zenml_keys), zenml_keys[:20]


def test_promotion_and_deploy_go_through_the_registry_over_http(stack, host_a, first_runs):
    client = MlflowClient(stack.mlflow_uri)
    champion = client.get_model_version_by_alias("team-digits", ALIAS)
    assert champion.version == "1"  # the cached run measured the champion and kept it
    assert champion.source.startswith(("mlflow-artifacts:/", "models:/")), champion.source  # the server's, over HTTP
    assert f"-> team-digits v1 (alias '{ALIAS}')" in first_runs["first"]
    assert "no promotion: " in first_runs["again"]
    # the host's deployed bundle is that version, its files byte for byte those the registry serves
    deployed = _current_version(host_a.deploy)
    assert (deployed["registered_model"], str(deployed["version"])) == ("team-digits", "1"), deployed
    bundle = (host_a.deploy / "current").resolve()
    registry_copy = download_version(stack.mlflow_uri, champion, host_a.root / "registry-copy")
    files = json.loads((registry_copy / "manifest.json").read_text())["files"]
    assert files and all((bundle / f).read_bytes() == (registry_copy / f).read_bytes() for f in files), files
    # ... and the MLflow server keeps them in the object store
    s3 = _s3(stack)
    stored = {hashlib.sha256(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read()).hexdigest()
              for k in _s3_keys(stack, "mlflow/") if k.endswith(tuple(files))}
    assert {v["sha256"] for v in files.values()} <= stored


def test_the_deployed_bundle_serves_digits(host_a, first_runs):
    digits = load_digits()
    pick = np.arange(0, len(digits.images), 36)
    pngs = []
    for i in pick:
        buf = io.BytesIO()
        Image.fromarray((digits.images[i] * 255 / 16).round().astype(np.uint8)).save(buf, format="PNG")
        pngs.append(("file", (f"{i}.png", buf.getvalue(), "image/png")))
    with running_server(host_a.deploy) as base:
        r = httpx.post(f"{base}/predict", files=pngs, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == "1"
    predicted = np.array([int(p["label"]) for p in body["predictions"]])
    assert (predicted == digits.target[pick]).mean() > 0.8, (predicted, digits.target[pick])


def test_two_hosts_promoting_at_once_agree_on_one_champion(stack, first_runs, tmp_path_factory):
    """Both hosts start on a model with no champion yet and the same (cached) models: each measures
    "no champion", each wants to promote; the registry must end with one champion that both deploy."""
    hosts = [Host(stack, tmp_path_factory.mktemp(f"host-{h}")) for h in ("b", "c")]
    procs = [h.run(team_config(stack, "team-race", h.deploy), f"team-race-{i}") for i, h in enumerate(hosts)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(finish, procs))
    client = MlflowClient(stack.mlflow_uri)
    versions = client.search_model_versions("name = 'team-race'")
    champion = client.get_model_version_by_alias("team-race", ALIAS)
    promoted = [o for o in outs if "-> team-race v" in o]
    assert len(promoted) == 1 and len(versions) == 1, (outs[0][-3000:], outs[1][-3000:])
    for h in hosts:
        deployed = _current_version(h.deploy)
        assert (deployed["registered_model"], str(deployed["version"])) == ("team-race", champion.version), deployed
    stages = {s["name"]: s["body"]["stage"] for s in ZenMLApi(stack).get("model_versions")["items"]
              if s["body"]["model"]["name"] == "team-race"}
    assert list(stages.values()).count("production") == 1, stages


def test_a_run_logs_to_the_server_that_mlflow_tracking_uri_names(stack, tmp_path):
    """No ``tracking`` section, MLFLOW_TRACKING_URI set (MLflow's own convention): the run's runs, metrics and
    registered model are on that server, and the embedded store is never created."""
    host = Host(stack, tmp_path / "laptop", zenml_server=False)
    host.env["MLFLOW_TRACKING_URI"] = stack.mlflow_uri
    config = {"name": "env-uri", "data": {"source": "digits"},
              "teacher": {"arch": "small_cnn", "width": 8, "epochs": 2},
              "variants": {"bases": ["teacher"], "quantization": ["fp32"], "formats": ["onnx"],
                           "runtimes": ["onnxruntime"]},
              "target": {"warmup": 2, "iterations": 20},
              "registry": {"name": "env-digits"}, "deploy": {"root": str(host.deploy)}}
    doc = json.loads(finish(host.run(config, "env-uri", "--json")).splitlines()[-1])  # stderr's lines before it
    assert doc["tracking_uri"] == stack.mlflow_uri and doc["promotion"]["promoted"], doc
    client = MlflowClient(stack.mlflow_uri)
    experiment = client.get_experiment_by_name("edgeopt")  # the default experiment
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], "tags.pipeline_run = 'env-uri'")
    roles = sorted(r.data.tags["edgeopt.role"] for r in runs)
    assert roles == ["pipeline", "variant"], roles
    variant = next(r for r in runs if r.data.tags["edgeopt.role"] == "variant")
    assert variant.info.run_name == doc["winner"] and variant.info.status == "FINISHED"
    (row,) = doc["rows"]  # the metrics the run measured (a 2-epoch teacher: above chance, not good)
    assert row["metrics"]["accuracy"] > 0.2
    assert {k: variant.data.metrics[k] for k in row["metrics"]} == pytest.approx(row["metrics"])
    champion = client.get_model_version_by_alias("env-digits", "champion")
    assert champion.run_id == variant.info.run_id and champion.source.startswith(("mlflow-artifacts:/", "models:/"))
    assert not list((host.root / "state").rglob("mlflow.db"))  # nothing in the embedded store


def test_two_workers_on_one_postgresql_study_run_disjoint_trials(stack, tmp_path, tiny_raw, digits, teacher_ckpt,
                                                                 student_ckpt, monkeypatch):
    """tests/test_search.py's two workers, on a study in a database of the team's PostgreSQL (its password in
    libpq's PGPASSWORD, inherited by the workers: not in the storage URL)."""
    import psycopg2

    storage = stack.create_database("optuna")
    monkeypatch.setenv("PGPASSWORD", stack.pg_env()["PGPASSWORD"])
    cfg = search_config(tmp_path, tiny_raw, "pg-pair", budget={"trials": 4}, storage=storage)
    check_two_workers_run_disjoint_trials(cfg, tmp_path, digits, teacher_ckpt, student_ckpt)
    with psycopg2.connect(storage) as conn, conn.cursor() as cur:  # the trials are PostgreSQL's
        cur.execute("SELECT count(*) FROM trials JOIN studies USING (study_id) WHERE study_name = 'pg-pair'")
        count = cur.fetchone()[0]
    assert count == len(trials_of(cfg, digits, student_ckpt)) >= 4  # the budget's 4, and any repeats
    assert not (tmp_path / "search.db").exists()
