"""Champion vs challenger, concurrent promotions, SIGKILL during deployment, rollback."""

import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from edgeopt import deploy as dep
from edgeopt.artifacts import ModelArtifact, new_workdir
from edgeopt.config import PromotionConfig
from edgeopt.evaluation import Evaluation, Reference, VariantResult
from edgeopt.pareto import Selection
from edgeopt.promotion import decide
from edgeopt.tracking import (
    TrackedRuns,
    alias_version,
    client_for,
    experiment_id,
    promote_winner,
    register_version,
    set_alias,
)
from tests.conftest import ROOT


def result(name, acc=0.98, p50=0.1, size=0.05):
    return VariantResult(variant=name, status="ok", recipe={"runtime": "onnxruntime"},
                         metrics={"accuracy": acc, "latency_p50_ms": p50, "size_mb": size})


def test_challenger_must_beat_the_champion_under_the_rule():
    rule = PromotionConfig(max_accuracy_loss=0.5, min_latency_gain_pct=5.0)
    champ = result("champion-v1:x", acc=0.98, p50=0.100)
    assert decide(result("a", acc=0.98, p50=0.090), champ, rule).promote  # 10 % faster, same accuracy
    slow = decide(result("b", acc=0.99, p50=0.098), champ, rule)  # 2 % faster only
    assert not slow.promote and "latency" in slow.reason and any("gain 2.0%" in c for c in slow.checks)
    worse = decide(result("c", acc=0.97, p50=0.05), champ, rule)  # 1 pt less accurate
    assert not worse.promote and "accuracy" in worse.reason
    assert decide(result("d"), None, rule).promote  # first champion
    broken = VariantResult(variant="champion-v1:x", status="failed", reason="shape mismatch")
    assert decide(result("e"), broken, rule).promote
    assert not decide(None, champ, rule, "no variant meets the constraints").promote
    sized = decide(result("f", p50=0.05, size=0.049), champ, PromotionConfig(min_size_gain_pct=10))
    assert not sized.promote and "size" in sized.reason


def _registered_model(uri: str, name: str, n_runs: int):
    """``n_runs`` finished MLflow runs with a real model folder, and v1 as the champion."""
    client = client_for(uri)
    exp = experiment_id(client, "promotion-test", uri)
    run_ids = []
    for i in range(n_runs):
        d = new_workdir("m")
        (d / "model.onnx").write_bytes(f"model {i}".encode() * 1000)
        model = ModelArtifact.write(d, {"variant": f"v{i}", "format": "onnx", "recipe": {}, "lineage": {}})
        run = client.create_run(exp, run_name=f"cand-{i}", tags={"runtime": "onnxruntime", "runtime.threads": "1"})
        client.log_artifacts(run.info.run_id, str(model.path), artifact_path="model")
        client.log_metric(run.info.run_id, "accuracy", 0.9 + i / 100)
        client.set_terminated(run.info.run_id)
        run_ids.append(run.info.run_id)
    set_alias(uri, name, "champion", register_version(uri, name, run_ids[0], tags={"runtime": "onnxruntime"}))
    return run_ids


def _promote_and_deploy(uri, name, run_id, root, barrier):
    ev = Evaluation(target={}, fingerprint={}, reference=Reference(variant="r", accuracy=1, latency_p50_ms=1, latency_p95_ms=1,
                                                                    size_mb=1, params=1),
                    results=[result("w")], champion=result("champion-v1:x"),
                    champion_version="1")
    sel = Selection(winner="w", reason="test", objective="latency", constraints={}, verdicts=[])
    decision = decide(result("w", p50=0.01), ev.champion, PromotionConfig())
    barrier.wait()
    out = promote_winner(uri=uri, name=name, alias="champion", selection=sel, evaluation=ev, decision=decision,
                         runs=TrackedRuns(parent_run_id="p", experiment_id="0", variant_runs={"w": run_id}), tags={})
    dep.deploy_from_registry(uri=uri, name=name, alias="champion", root=root,
                             dataset_manifest={"classes": ["a"], "input_shape": [1], "mean": [0], "std": [1], "scale": 1})
    return out.promoted


def test_concurrent_promotions_leave_one_champion_and_a_consistent_deploy_folder(tmp_path):
    uri, name, root = f"sqlite:///{tmp_path / 'mlflow.db'}", "concurrent", tmp_path / "deploy"
    run_ids = _registered_model(uri, name, 5)
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(4)
    with ctx.Pool(4) as pool:
        promoted = pool.starmap(_promote_and_deploy, [(uri, name, rid, root, barrier) for rid in run_ids[1:]])
    assert sum(promoted) == 1  # the others saw the champion move and refused
    champion = alias_version(uri, name, "champion")
    assert champion.run_id == run_ids[1 + promoted.index(True)]
    cur = dep.current(root)
    cur.verify()
    assert cur.manifest["version"] == str(champion.version)
    assert not list((root / "versions").glob(".tmp-*"))


DEPLOY_LOOP = """
import sys
from pathlib import Path
from edgeopt import deploy as dep
from edgeopt.artifacts import new_workdir
root = Path(sys.argv[1])
i = 0
while True:
    d = new_workdir("m")
    (d / "model.onnx").write_bytes(bytes([i % 251]) * 4_000_000)
    dep.deploy(d, root, name=f"b{i}", model_files=["model.onnx"], runtime={"runtime": "onnxruntime"},
               labels=["a"], info={"i": i}, keep=3)
    print(i, flush=True)
    i += 1
"""


def test_sigkill_during_deployment_never_leaves_a_half_bundle(tmp_path):
    root = tmp_path / "deploy"
    rng = random.Random(0)
    kills = 0
    for _ in range(12):
        p = subprocess.Popen([sys.executable, "-c", DEPLOY_LOOP, str(root)], cwd=ROOT, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        p.stdout.readline()  # at least one bundle is complete
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        kills += 1
        cur = dep.current(root)
        assert cur is not None, "current must always point at a bundle"
        cur.verify()  # every file present, every sha256 right
        assert (cur.path / "model.onnx").stat().st_size == 4_000_000
    assert kills == 12
    d = new_workdir("m")
    (d / "model.onnx").write_bytes(b"final")
    final = dep.deploy(d, root, name="final", model_files=["model.onnx"], runtime={"runtime": "onnxruntime"},
                       labels=["a"], info={}, keep=3)
    assert dep.current(root).path == final.path and not list((root / "versions").glob(".tmp-*"))


def test_rollback_restores_the_previous_bundle_and_alias(tmp_path):
    uri, name, root = f"sqlite:///{tmp_path / 'mlflow.db'}", "rollback", tmp_path / "deploy"
    run_ids = _registered_model(uri, name, 2)
    manifest = {"classes": ["a"], "input_shape": [1], "mean": [0], "std": [1], "scale": 1}
    first = dep.deploy_from_registry(uri=uri, name=name, alias="champion", root=root, dataset_manifest=manifest)
    set_alias(uri, name, "champion", register_version(uri, name, run_ids[1], tags={"runtime": "onnxruntime"}))
    second = dep.deploy_from_registry(uri=uri, name=name, alias="champion", root=root, dataset_manifest=manifest)
    assert second.manifest["version"] == "2" and dep.current(root).path == second.path
    back = dep.rollback(root, uri=uri, alias="champion")
    assert back.path == first.path and dep.current(root).manifest["version"] == "1"
    assert str(alias_version(uri, name, "champion").version) == "1"
    assert (dep.current(root).path / "model.onnx").read_bytes() == b"model 0" * 1000
    with pytest.raises(LookupError, match="nothing to roll back"):
        dep.rollback(root, uri=uri, alias="champion")
