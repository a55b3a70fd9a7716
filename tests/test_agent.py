"""Target devices: two edge agents on loopback stand in for two devices (different runtimes and
thread counts); the pipeline measures on both, each gets its own front, winner and alias.

The agents run as real processes (``python -m edgeopt.agent``) with torch, ZenML, MLflow and
scikit-learn made unimportable (a ``sitecustomize`` on their PYTHONPATH that the job processes
inherit): what passes here runs on a device with only infra/agent/requirements.txt.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from edgeopt.agent.client import Agent, AgentError, pack_job
from edgeopt.agent.targets import evaluate_on_device, evaluate_on_targets, preflight_targets
from edgeopt.config import DeviceTargetConfig, TargetConfig
from edgeopt.measure.evaluate import evaluate_variants
from edgeopt.plan import parse_config
from edgeopt.select.pareto import select
from edgeopt.select.report import pareto_plot

pytestmark = pytest.mark.slow  # agent processes and pipeline runs (docs/tests.md: the inner loop skips them)

ROOT = Path(__file__).resolve().parent.parent
TOKENS = {"a": "token-of-device-a-0123456789", "b": "token-of-device-b-0123456789", "c": "token-of-device-c-0123456789"}
BLOCKER = '''import sys
BLOCKED = {"torch", "torchvision", "zenml", "mlflow", "sklearn", "nncf"}
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"not on the device: {name}", name=name)
sys.meta_path.insert(0, _Block())
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProcess:
    def __init__(self, tmp: Path, name: str, *args: str):
        self.name, self.port, self.token = name, free_port(), TOKENS[name]
        self.url = f"http://127.0.0.1:{self.port}"
        self.work = tmp / f"{name}-work"
        self.work.mkdir()
        self.log = tmp / f"{name}.log"
        (tmp / "blocker").mkdir(exist_ok=True)
        (tmp / "blocker" / "sitecustomize.py").write_text(BLOCKER)
        env = {**os.environ, "EDGEOPT_AGENT_TOKEN": self.token, "PYTHONPATH": str(tmp / "blocker")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeopt.agent", "--port", str(self.port), "--work-dir", str(self.work), *args],
            cwd=ROOT, env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).read()
                break
            except OSError:
                assert self.proc.poll() is None and time.time() < deadline, self.log.read_text()
                time.sleep(0.2)

    def client(self, timeout_s: float = 300) -> Agent:
        return Agent(self.url, self.token, timeout_s)

    def wait_idle(self) -> None:
        deadline = time.time() + 120
        while self.client().info()["busy"]:
            assert time.time() < deadline
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agents")
    started = {"a": AgentProcess(tmp, "a"), "b": AgentProcess(tmp, "b", "--runtimes", "onnxruntime")}
    yield started
    for a in started.values():
        a.stop()


def target(agent: AgentProcess, **kw) -> DeviceTargetConfig:
    os.environ[f"AGENT_{agent.name.upper()}_TOKEN"] = agent.token
    return DeviceTargetConfig(label=agent.name, url=agent.url, token_env=f"AGENT_{agent.name.upper()}_TOKEN", **kw)


@pytest.fixture(scope="module")
def devices_run(agents, tiny_raw, state_dir):
    from edgeopt_zenml.pipelines.runner import run_pipeline

    raw = {
        **tiny_raw, "name": "devices",
        "teacher": {"arch": "small_cnn", "width": 8, "epochs": 3, "lr": 0.05}, "student": None,
        "variants": {"bases": ["teacher"], "quantization": ["fp32", "int8"], "formats": ["onnx"],
                     "runtimes": ["onnxruntime", "openvino"], "quant": {"calibration_samples": 64}},
        "target": {"warmup": 5, "iterations": 30, "constraints": {"max_accuracy_drop": 10.0}},
        "registry": {"name": "devices-model"}, "tracking": {**tiny_raw["tracking"], "experiment": "devices"},
        "deploy": {"root": str(state_dir / "deploy-devices"), "keep": 2},
        "targets": [target(agents["a"]).model_dump(mode="json"), target(agents["b"], threads=2).model_dump(mode="json")],
    }
    cfg = parse_config(raw, "devices")
    return cfg, run_pipeline(cfg, run_name="devices-first")


def test_the_pipeline_measures_on_both_agents(devices_run, agents):
    cfg, out = devices_run
    ev = out["evaluation"]
    assert [e.label for e in ev.devices] == ["a", "b"]
    infos = {name: a.client().info() for name, a in agents.items()}
    for e in ev.devices:
        assert e.fingerprint == infos[e.label]["fingerprint"] and e.error is None
        assert e.device["url"] == agents[e.label].url and e.device["peak_rss_mb"] > 10
    a, b = ev.devices
    assert a.fingerprint["id"] != b.fingerprint["id"] and "openvino" in a.fingerprint and "openvino" not in b.fingerprint
    assert all(r.ok for r in a.results), [r.reason for r in a.results if not r.ok]
    assert a.reference.accuracy > 0.8 and abs(b.reference.accuracy - a.reference.accuracy) < 0.01  # same model
    assert a.reference.test_accuracy > 0.8 and abs(b.reference.test_accuracy - a.reference.test_accuracy) < 0.01
    for r in b.results:  # device b has no OpenVINO: those variants fail there alone
        if r.variant.endswith("@openvino"):
            assert not r.ok and "runtime openvino is not offered by the agent on b" in r.reason
        else:
            assert r.ok and r.runtime_settings["threads"] == 2 and r.metrics["latency_p50_ms"] > 0
    assert all(r.runtime_settings["threads"] == 1 for r in a.results)
    # each agent's log shows the one job it ran, and nothing of a job stays on its disk
    for name, agent in agents.items():
        jobs = [ln for ln in agent.log.read_text().splitlines() if " job " in ln and "peak" in ln]
        assert len(jobs) == 1 and ("4 models" if name == "a" else "2 models") in jobs[0], agent.log.read_text()
        assert list(agent.work.iterdir()) == []


def test_each_device_gets_its_front_alias_and_metrics(devices_run):
    cfg, out = devices_run
    ev, run = out["evaluation"], out["run"]
    targets = run.steps["select"].outputs["target_selections"][0].load().targets
    assert [(t.label, t.alias) for t in targets] == [("a", "champion"), ("b", "champion-b")]
    assert targets[0].selection == out["selection"]
    assert all(t.selection.winner for t in targets)
    assert not targets[1].selection.winner.endswith("@openvino")
    report = str(run.steps["select"].outputs["selection_report"][0].load())
    assert "## Devices" in report and "### Target `b`" in report and targets[1].fingerprint in report
    assert ("winners differ" in report) == (targets[0].selection.winner != targets[1].selection.winner)
    client = MlflowClient(cfg.tracking_uri())
    for t in targets:  # every device's winner behind its own alias, the first one deployed
        mv = client.get_model_version_by_alias(cfg.registry.name, t.alias)
        assert client.get_run(mv.run_id).info.run_name == t.selection.winner
    runs = out["run"].steps["track"].outputs["mlflow_runs"][0].load()
    shared = client.get_run(runs.variant_runs["teacher-int8-onnx@onnxruntime"])
    for e in ev.devices:
        assert shared.data.tags[f"device.{e.label}.fingerprint"] == e.fingerprint["id"]
        assert shared.data.metrics[f"{e.label}.latency_p50_ms"] == e.result("teacher-int8-onnx@onnxruntime").metrics[
            "latency_p50_ms"]
    ov = client.get_run(runs.variant_runs["teacher-int8-onnx@openvino"])
    assert "b.latency_p50_ms" not in ov.data.metrics and "not offered" in ov.data.tags["device.b.failure_reason"]
    bundle = json.loads((Path(out["bundle"]) / "manifest.json").read_text())
    assert bundle["variant"] == targets[0].selection.winner


def test_the_champion_is_measured_in_the_same_job(agents, digits, teacher_onnx):
    ev = evaluate_on_device([teacher_onnx], {teacher_onnx.variant: ["onnxruntime"]}, digits,
                            "teacher-fp32-onnx@onnxruntime", TargetConfig(warmup=2, iterations=20), target(agents["b"]),
                            champion=(teacher_onnx, "7", "onnxruntime"))
    ref, champ = ev.results[0], ev.champion
    assert ev.champion_version == "7" and champ.variant == "champion-v7:teacher-fp32-onnx@onnxruntime" and champ.ok
    assert champ.metrics["accuracy"] == ref.metrics["accuracy"] and champ.metrics["latency_p50_ms"] > 0
    assert champ.metrics["test_accuracy"] == ref.metrics["test_accuracy"]
    # the job packs the val images, then the test images: the agent's figures are the ones measured here
    here = evaluate_variants([teacher_onnx], {teacher_onnx.variant: ["onnxruntime"]}, digits,
                             "teacher-fp32-onnx@onnxruntime", TargetConfig(warmup=2, iterations=20))
    assert (ev.reference.accuracy, ev.reference.test_accuracy) == (here.reference.accuracy, here.reference.test_accuracy)
    jobs = [ln for ln in agents["b"].log.read_text().splitlines() if " job " in ln and "peak" in ln]
    assert "2 models (onnxruntime 2)" in jobs[-1]


def test_wrong_token_stops_the_run_before_training(devices_run, agents, tmp_path):
    cfg, _ = devices_run
    os.environ["AGENT_A_WRONG"] = "not-the-token-of-a-0000"
    bad = target(agents["a"]).model_copy(update={"token_env": "AGENT_A_WRONG"})
    with pytest.raises(AgentError) as err:
        preflight_targets([target(agents["b"]), bad])
    assert str(err.value) == f"target a: agent {agents['a'].url} refused the token ($AGENT_A_WRONG)"
    raw = {**cfg.model_dump(mode="json"), "targets": [bad.model_dump(mode="json")]}
    path = tmp_path / "wrong-token.yaml"
    path.write_text(json.dumps(raw))
    t = time.perf_counter()
    cli = subprocess.run([sys.executable, "run.py", "run", "-c", str(path)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ}, timeout=120)
    assert cli.returncode == 2 and time.perf_counter() - t < 60
    lines = cli.stderr.strip().splitlines()
    assert lines[-1] == f"edgeopt: error: target a: agent {agents['a'].url} refused the token ($AGENT_A_WRONG)", cli.stderr
    assert cli.stdout == ""


def test_an_agent_that_does_not_answer_or_is_slow_is_one_line(agents, digits, teacher_onnx):
    with socket.socket() as mute:  # accepts connections, never answers
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        t = time.perf_counter()
        with pytest.raises(AgentError, match=r"^agent http://127.0.0.1:\d+ did not answer within 1 s$"):
            Agent(f"http://127.0.0.1:{mute.getsockname()[1]}", "x" * 16).info(timeout=1)
        assert time.perf_counter() - t < 5
    slow = TargetConfig(warmup=0, iterations=10, time_budget_s=8)
    t = time.perf_counter()
    ev = evaluate_on_device([teacher_onnx], {teacher_onnx.variant: ["onnxruntime"]}, digits,
                            "teacher-fp32-onnx@onnxruntime", slow, target(agents["a"], timeout_s=3))
    assert time.perf_counter() - t < 15
    assert ev.error == f"target a: agent {agents['a'].url} did not answer within 3 s"
    assert [r.reason for r in ev.results] == [ev.error]
    # the agent goes on with that job and takes no other meanwhile
    with pytest.raises(AgentError, match=r"refused POST /jobs \(409\): busy: the agent runs one job at a time$"):
        agents["a"].client()._call("POST", "/jobs", 5, body=b"x", length=1)
    again = evaluate_on_device([teacher_onnx], {teacher_onnx.variant: ["onnxruntime"]}, digits,
                               "teacher-fp32-onnx@onnxruntime", slow, target(agents["a"]))
    assert again.error == f"target a: agent {agents['a'].url} is busy with another job (it runs one at a time)"
    agents["a"].wait_idle()


def test_an_agent_past_its_time_budget_or_dropped_fails_its_variants_and_the_run_goes_on(tmp_path, agents, digits,
                                                                                           teacher_onnx):
    c = AgentProcess(tmp_path, "c", "--job-timeout-s", "10")
    devices = [target(agents["b"]), target(c)]
    try:
        preflight_targets(devices)
        slow = TargetConfig(warmup=0, iterations=10, time_budget_s=30)
        ev = evaluate_on_targets([teacher_onnx], {teacher_onnx.variant: ["onnxruntime"]}, digits,
                                 "teacher-fp32-onnx@onnxruntime", slow.model_copy(update={"time_budget_s": 0.5}),
                                 devices, {})
        assert ev.error is None and ev.others[0].error is None and ev.others[0].results[0].ok
        ev = evaluate_on_device([teacher_onnx], {teacher_onnx.variant: ["onnxruntime"]}, digits,
                                "teacher-fp32-onnx@onnxruntime", slow, target(c))
        assert ev.error == (f"target c: agent {c.url} refused POST /jobs (504): the job ran past the agent's time "
                            "budget of 10 s (--job-timeout-s)")
        assert list(c.work.iterdir()) == [] and not c.client().info()["busy"]
    finally:
        c.stop()
    ev = evaluate_on_targets([teacher_onnx], {teacher_onnx.variant: ["onnxruntime"]}, digits,
                             "teacher-fp32-onnx@onnxruntime", TargetConfig(warmup=2, iterations=10), devices, {})
    assert ev.results[0].ok  # device b measured
    assert ev.others[0].error.startswith(f"target c: agent {c.url} does not answer: ")
    dead = ev.others[0]
    assert not dead.results[0].ok and dead.fingerprint["id"] == "unknown"
    # selection and its report go on for a device that measured nothing
    sel = select(dead.metrics_by_variant(), {"max_accuracy_drop": 1.0}, "latency")
    assert sel.winner is None and pareto_plot(dead, sel, tmp_path / "pareto.png").stat().st_size > 0


def test_a_model_over_the_size_cap_is_refused(tmp_path, digits, teacher_onnx):
    small = AgentProcess(tmp_path, "c", "--max-model-mb", "0.01")
    try:
        size_mb = teacher_onnx.model_bytes / 1e6
        assert size_mb > 0.01
        # the pipeline's client does not send it: the model fails on that device, with the reason
        ev = evaluate_on_device([teacher_onnx], {teacher_onnx.variant: ["onnxruntime"]}, digits,
                                "teacher-fp32-onnx@onnxruntime", TargetConfig(), target(small))
        assert ev.results[0].reason == f"model of {size_mb:.2f} MB over the cap of the agent on c (0.01 MB)"
        # and the agent itself refuses it before unpacking anything
        job = pack_job(tmp_path / "job.tar", {"threads": 1, "batch": 1, "warmup": 0, "iterations": 10},
                       {"m": ("onnxruntime", teacher_onnx.model_file, [teacher_onnx.model_file])},
                       [digits.sample("test", 4)], 4, digits.sample("test", 1))
        with tarfile.open(job) as tar:
            assert "models/0/model.onnx" in tar.getnames()
        with pytest.raises(AgentError, match=r"\(413\): models/0: model of .* MB over the agent's cap of 0.01 MB "
                                             r"\(--max-model-mb\)$"):
            small.client().run(job)
        with pytest.raises(AgentError, match="refused the token"):
            Agent(small.url, "wrong-token-0000000000").run(job)
        assert list(small.work.iterdir()) == []
    finally:
        small.stop()
    log = small.log.read_text()
    assert "refused 413: models/0" in log


@pytest.fixture(scope="module")
def teacher_onnx(devices_run):
    """The run's reference model (the teacher's FP32 ONNX), as the pipeline exported it."""
    from edgeopt.plan.variants import variant_plan

    cfg, out = devices_run
    step = next(b.export_id for b in variant_plan(cfg).builds if b.fp32_name == "teacher-fp32-onnx")
    model = next(iter(out["run"].steps[step].outputs.values()))[0].load()
    assert model.variant == "teacher-fp32-onnx"
    return model
