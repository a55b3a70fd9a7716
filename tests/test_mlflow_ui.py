"""The CLI as CI retraining runs it (quality gate, report folder, ZenML run config), and what the
MLflow UI shows of it: a real `mlflow server` on 127.0.0.1 over the store the run wrote, read by
Debian's chromium (headless, through chromedriver). Screenshots go to test-artifacts/mlflow-ui/.
"""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from decimal import Decimal
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient
from selenium.webdriver.common.by import By
from zenml.client import Client

from edgeopt.artifacts import ModelArtifact
from edgeopt.config import PROJECT_ROOT
from edgeopt.track.runs import DIGEST_CHARS, VIEW_KEY, VIEW_METRICS
from tests._browser import chromium, shown

pytestmark = pytest.mark.slow  # CLI pipeline runs, an MLflow server and a browser (docs/tests.md: the inner loop skips them)

SCREENSHOTS = PROJECT_ROOT / "test-artifacts" / "mlflow-ui"
RUN_CONFIG = PROJECT_ROOT / "infra" / "kubeflow" / "run_config.yaml"
ASSISTANT_CLOSE = "//*[normalize-space(text())='MLflow Assistant']/following::button[@aria-label='Close'][1]"
METRICS = ("accuracy", "accuracy_drop", "latency_p50_ms", "latency_p95_ms", "size_mb", "speedup_vs_reference")
# what the libraries print when they reach the terminal: the ONNX exporter's passes, NNCF, MLflow, torch
LIBRARY_CHATTER = ("Skipping constant folding", "No unused functions to remove", "PassManager:", "INFO:nncf",
                   "Creating initial MLflow database tables", "Downloading artifacts", "No CUDA runtime is found")


def _cli(config: dict, path: Path, *args: str) -> subprocess.CompletedProcess:
    """`python run.py run -c configs/default.yaml -c <config> ...` in a fresh process, on this session's ZenML
    store: the last -c wins, which infra/ci/retrain.sh relies on (its own -c, then the caller's arguments)."""
    path.write_text(yaml.safe_dump(config))
    default = str(PROJECT_ROOT / "configs" / "default.yaml")
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "run.py"), "run", "-c", default, "-c", str(path), *args],
                          cwd=PROJECT_ROOT, env={**os.environ, "EDGEOPT_TRIGGER": "ci"}, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def ci_run(tiny_raw, state_dir):
    """The tiny config through the gate, into its own MLflow store (what the UI is started over)."""
    config = {**tiny_raw, "name": "tiny-ui", "registry": {"name": "tiny-ui-model"},
              "tracking": {"uri": f"sqlite:///{state_dir / 'mlflow-ui.db'}", "experiment": "tiny-ui"},
              "deploy": {"root": str(state_dir / "deploy-ui"), "keep": 2}}
    report = state_dir / "report-ui"
    proc = _cli(config, state_dir / "tiny-ui.yaml", "--run-name", "tiny-ui-ci", "--require-promotion",
                "--report-dir", str(report), "--zenml-config", str(RUN_CONFIG))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"config": config, "report": report, "stdout": proc.stdout, "stderr": proc.stderr}


def test_ci_run_passes_the_gate_and_leaves_the_report(ci_run):
    assert "winner: " in ci_run["stdout"]
    report = ci_run["report"]
    assert "tiny-ui-ci" in (report / "selection.md").read_text()
    assert (report / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the ZenML run config reached the steps (the local orchestrator records the settings, ignores them)
    run_config = yaml.safe_load(RUN_CONFIG.read_text())
    resources = Client().get_pipeline_run("tiny-ui-ci").steps["train_teacher"].config.resource_settings
    assert resources.cpu_count == run_config["steps"]["train_teacher"]["settings"]["resources"]["cpu_count"]
    mlflow = MlflowClient(ci_run["config"]["tracking"]["uri"])
    parent = mlflow.search_runs([mlflow.get_experiment_by_name("tiny-ui").experiment_id],
                                filter_string="attributes.run_name = 'tiny-ui-ci'")[0]
    assert parent.data.tags["trigger"] == "ci"


def test_the_terminal_shows_edgeopts_lines_and_the_run_log_has_everything(ci_run):
    terminal = ci_run["stdout"] + ci_run["stderr"]
    assert "track: MLflow run" in terminal and "winner: " in terminal
    chatter = [line for line in terminal.splitlines() if any(c in line for c in LIBRARY_CHATTER)]
    assert not chatter, chatter[:10]
    log = (Path(os.environ["EDGEOPT_STATE_DIR"]) / "logs" / "tiny-ui-ci.log").read_text()
    assert "edgeopt.track.runs: track: MLflow run" in log and "edgeopt.deploy.folder" in log


def test_each_variant_is_an_mlflow_logged_model_with_its_metrics_dataset_and_source(ci_run, tmp_path):
    uri = ci_run["config"]["tracking"]["uri"]
    mlflow.set_tracking_uri(uri)  # models:/ URIs resolve through the global tracking URI
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny-ui")
    parent = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'tiny-ui-ci'")[0]
    variants = client.search_runs([experiment.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' AND tags.`edgeopt.role` = 'variant'"))
    data_hash = parent.data.tags["data_hash"]
    # the dataset, as every run's input: its name, the data hash as digest, where it comes from
    for run in [parent, *variants]:
        (data,) = run.inputs.dataset_inputs
        assert (data.dataset.name, data.dataset.digest, data.dataset.source_type) == ("digits", data_hash[:DIGEST_CHARS],
                                                                                      "code")
        assert "sklearn.datasets.load_digits" in data.dataset.source
        assert {t.key: t.value for t in data.tags} == {"mlflow.data.context": "test"}
        # MLflow's source tags: who ran it, from which entry point and commit
        assert run.data.tags["mlflow.source.name"].endswith("run.py") and run.data.tags["mlflow.user"]
        assert run.data.tags["mlflow.source.git.commit"] == parent.data.tags["git_commit"].removesuffix("-dirty")
    models = {m.source_run_id: m for m in client.search_logged_models([experiment.experiment_id])}
    formats = set()
    for run in variants:
        model = models[run.info.run_id]
        assert (model.name, model.status) == (run.info.run_name, LoggedModelStatus.READY)
        assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
        # the run's metrics are the model's, measured on the dataset: the Models tab compares them
        assert {m.key: m.value for m in model.metrics} == run.data.metrics
        assert {(m.dataset_name, m.dataset_digest) for m in model.metrics} == {("digits", data_hash[:DIGEST_CHARS])}
        # the model's files are the variant's folder, byte for byte (+ MLflow's flavor files for ONNX)
        files = ModelArtifact(Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{model.model_id}", dst_path=str(tmp_path / model.model_id))))
        files.verify()
        assert files.variant == run.info.run_name.split("@")[0]
        assert (files.path / "MLmodel").is_file() == (files.format == "onnx"), run.info.run_name
        formats.add(files.format)
    assert formats == {"onnx", "openvino"}
    onnx_model = next(m for m in models.values() if m.name == "student-int8-onnx@onnxruntime")
    logits = mlflow.pyfunc.load_model(f"models:/{onnx_model.model_id}").predict(np.zeros((2, 1, 8, 8), np.float32))
    assert np.asarray(next(iter(logits.values())) if isinstance(logits, dict) else logits).shape == (2, 10)
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{VIEW_KEY}"])
    assert all(f"metrics.`{m}`" in view["selectedColumns"] for m in VIEW_METRICS)


def test_quality_gate_fails_with_exit_3_when_no_variant_fits(tiny_raw, state_dir):
    v = tiny_raw["variants"]
    config = {**tiny_raw, "name": "tiny-gate", "registry": {"name": "tiny-gate-model"},
              "variants": {**v, "shrink": {}, "quantization": ["fp32"], "formats": ["onnx"],
                           "runtimes": ["onnxruntime"]},
              "target": {**tiny_raw["target"], "constraints": {"max_accuracy_drop": 10.0, "max_size_mb": 0.001}},
              "tracking": {"uri": f"sqlite:///{state_dir / 'mlflow-gate.db'}", "experiment": "tiny-gate"},
              "deploy": {"root": str(state_dir / "deploy-gate"), "keep": 2}}
    report = state_dir / "report-gate"
    proc = _cli(config, state_dir / "tiny-gate.yaml", "--require-promotion", "--report-dir", str(report))
    assert proc.returncode == 3, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("edgeopt: quality gate failed: "), proc.stderr
    assert (report / "selection.md").is_file() and (report / "pareto.png").is_file()  # uploaded by CI all the same


@pytest.fixture(scope="module")
def mlflow_ui(ci_run, state_dir):
    """`mlflow server` on a free loopback port over the CI run's store; its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = state_dir / "mlflow-server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", ci_run["config"]["tracking"]["uri"],
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, f"mlflow server exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "mlflow server did not answer /health within 120 s"
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the uvicorn process it started
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium-profile"), "3000,1400") as driver:
        yield driver


def _js(value: float) -> str:
    """A number as JavaScript's toString writes it: how the MLflow UI shows a raw metric."""
    if value != 0 and abs(value) < 1e-6:
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", repr(value))
    text = format(Decimal(repr(value)), "f")
    return text[:-2] if text.endswith(".0") else text


def _mlflow_metric(value: float) -> str:
    """A metric as the run comparison prints it (Utils.formatMetric in mlflow/server/js)."""
    if value == 0:
        return "0"
    if abs(value) < 0.001:
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{value:.3e}")
    scale = 1000 if abs(value) < 10 else 100 if abs(value) < 100 else 10
    return _js(math.floor(value * scale + 0.5) / scale)  # Math.round


def _close_assistant(driver) -> None:
    """The MLflow Assistant panel takes a third of the width, and the comparison table only draws the
    run columns that fit."""
    for close in driver.find_elements(By.XPATH, ASSISTANT_CLOSE):
        close.click()


def _shown(driver, expected: list, shot: str = "", scroll_to: str = "") -> str:
    return shown(driver, expected, SCREENSHOTS / shot if shot else None, 90,
                 each_poll=lambda: _close_assistant(driver), scroll_to=scroll_to)


def test_mlflow_ui_shows_every_variant_run_and_its_metrics(ci_run, mlflow_ui, browser):
    client = MlflowClient(ci_run["config"]["tracking"]["uri"])
    experiment = client.get_experiment_by_name("tiny-ui")
    parent = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'tiny-ui-ci'")[0]
    variants = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = [r.info.run_name for r in variants]
    assert "student-p50-int8-onnx@onnxruntime" in names and "teacher-fp32-onnx@onnxruntime" in names
    ml_view = "workflowType=machine_learning"  # MLflow 3 opens experiments in its GenAI view

    # the experiment's runs table: the pipeline run, and its variant runs once expanded
    browser.get(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs?{ml_view}")
    _shown(browser, ["tiny-ui", "Run Name", "tiny-ui-ci"])
    browser.find_element(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']").click()
    _shown(browser, names, "experiment-runs.png")

    # the edgeopt view (MLflow's shared view, set by every run): each pipeline run's variants with the
    # metrics that decide them, without a click
    winner = next(r for r in variants if r.data.tags.get("winner") == "true")
    view = f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs?viewStateShareKey={VIEW_KEY}&{ml_view}"
    browser.get(view)
    _shown(browser, [*names, "Group: tiny-ui-ci", *VIEW_METRICS, "pareto",
                     *(_js(winner.data.metrics[m]) for m in VIEW_METRICS)], "experiment-runs-view.png")

    # the Models tab: each variant's LoggedModel with its metrics on the dataset, the deciding ones first
    browser.get(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/models?{ml_view}")
    _shown(browser, [*names, "digits", *VIEW_METRICS, *(_js(winner.data.metrics[m]) for m in VIEW_METRICS)],
           "models-tab.png")

    # the variants side by side, each by its recipe name, with their accuracies
    ids, exps = json.dumps([r.info.run_id for r in variants]), json.dumps([experiment.experiment_id])
    browser.get(f"{mlflow_ui}/#/compare-runs?runs={urllib.parse.quote(ids)}&experiments={urllib.parse.quote(exps)}")
    text = _shown(browser, [f"Comparing {len(variants)} Runs", *names, "accuracy"], "compare-variants.png", "Metrics")
    shown = text[text.index("\nMetrics\n"):]
    assert all(_mlflow_metric(r.data.metrics["accuracy"]) in shown for r in variants), shown[:2000]

    # the winner's own page: every metric with its value
    browser.get(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs/{winner.info.run_id}?{ml_view}")
    _shown(browser, [winner.info.run_name, *(f"{m}\n{_js(winner.data.metrics[m])}" for m in METRICS)],
           "winner-run.png")
