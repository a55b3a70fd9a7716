"""Real, tiny registered models for the deploy / promotion / rollback tests (also imported by their
subprocesses): ONNX models that ONNX Runtime loads, MLflow runs that hold them the way
``log_pipeline_run`` logs a variant, and promotion through the real ``promote_winner``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeopt.artifacts import ModelArtifact, new_workdir
from edgeopt.config import PromotionConfig
from edgeopt.measure.evaluate import Evaluation, Reference, VariantResult
from edgeopt.registry.promote import PromotionResult, promote_winner
from edgeopt.registry.versions import alias_version
from edgeopt.select.pareto import Selection
from edgeopt.select.promotion import decide
from edgeopt.track.runs import SERVING_FILE, TrackedRuns, serving_info
from edgeopt.track.uri import client_for, experiment_id

SHAPE = (1, 2, 2)
LABELS = ["a", "b"]
DATASET = {"classes": LABELS, "input_shape": list(SHAPE), "mean": [0.5], "std": [0.25], "scale": 255.0}


def onnx_model(path: Path, seed: int, *, classes: int = 2, hidden: int = 0) -> Path:
    """Flatten -> MatMul [-> MatMul hidden x hidden -> MatMul]: a distinct model per ``seed``;
    ``hidden`` makes the file about 4 * hidden^2 bytes (a long copy, for the SIGKILL tests)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(SHAPE))
    dims = [n, hidden, hidden, classes] if hidden else [n, classes]
    weights = [numpy_helper.from_array(rng.normal(0, 0.5, (a, b)).astype(np.float32), f"w{i}")
               for i, (a, b) in enumerate(zip(dims, dims[1:]))]
    nodes = [helper.make_node("Flatten", ["input"], ["h0"], axis=1)]
    nodes += [helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"]) for i in range(len(weights))]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *SHAPE])],
        [helper.make_tensor_value_info(f"h{len(weights)}", TensorProto.FLOAT, ["batch", classes])],
        initializer=weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def model_dir(seed: int, **kw) -> ModelArtifact:
    """A model folder as export writes one (``model.onnx`` + manifest)."""
    d = new_workdir("m")
    onnx_model(d / "model.onnx", seed, **kw)
    return ModelArtifact.write(d, {"variant": f"tiny-{seed}", "format": "onnx", "recipe": {}, "lineage": {},
                                   "output": "logits"})


def deploy_info(name: str, version: str, **extra) -> dict:
    """``info`` for :func:`edgeopt.deploy.folder.deploy` of a tiny model."""
    return {"registered_model": name, "version": version, "run_id": f"run-{version}",
            "preprocessing": {k: DATASET[k] for k in ("input_shape", "mean", "std", "scale")}, **extra}


def logged_run(uri: str, seed: int, dataset: Optional[dict] = None, **kw) -> str:
    """A finished MLflow run holding a tiny model as ``model/`` and its ``serving/serving.json``,
    as ``log_pipeline_run`` logs a variant; returns its id."""
    client = client_for(uri)
    run = client.create_run(experiment_id(client, "promotion-test", uri), run_name=f"tiny-{seed}@onnxruntime",
                            tags={"runtime": "onnxruntime", "runtime.threads": "1"})
    rid = run.info.run_id
    client.log_artifacts(rid, str(model_dir(seed, **kw).path), artifact_path="model")
    client.log_dict(rid, serving_info(dataset or DATASET), SERVING_FILE)
    client.log_metric(rid, "accuracy", 0.9)
    client.set_terminated(rid)
    return rid


def result(name: str, acc: float = 0.98, p50: float = 0.1, size: float = 0.05) -> VariantResult:
    return VariantResult(variant=name, status="ok", recipe={"runtime": "onnxruntime"},
                         metrics={"accuracy": acc, "latency_p50_ms": p50, "size_mb": size})


def promote(uri: str, name: str, run_id: str, *, measured: Optional[str] = "now", alias: str = "champion",
            lease_seconds: Optional[float] = None) -> PromotionResult:
    """``promote_winner`` for a winner that beats the champion; ``measured`` is the champion version the
    run measured ("now": the alias's version read just before, as a run that measured it would)."""
    if measured == "now":
        mv = alias_version(uri, name, alias)
        measured = str(mv.version) if mv is not None else None
    champion = result(f"champion-v{measured}:x") if measured else None
    ev = Evaluation(target={}, fingerprint={}, results=[result("w")], champion=champion, champion_version=measured,
                    reference=Reference(variant="r", accuracy=1, latency_p50_ms=1, latency_p95_ms=1, size_mb=1,
                                        params=1))
    sel = Selection(winner="w", reason="test", objective="latency", constraints={}, verdicts=[])
    decision = decide(result("w", p50=0.01), champion, PromotionConfig())
    kw = {} if lease_seconds is None else {"lease_seconds": lease_seconds}
    return promote_winner(uri=uri, name=name, alias=alias, selection=sel, evaluation=ev, decision=decision,
                          runs=TrackedRuns(parent_run_id="p", experiment_id="0", variant_runs={"w": run_id}), tags={},
                          **kw)


def champion_run(uri: str, name: str) -> Optional[str]:
    mv = alias_version(uri, name, "champion")
    return mv.run_id if mv is not None else None


def versions(uri: str, name: str) -> List[str]:
    return sorted((mv.version for mv in client_for(uri).search_model_versions(f"name = '{name}'")), key=int)
