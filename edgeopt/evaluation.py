"""Evaluate every variant on the runtime it will run on, all in one process and one harness.

Accuracy is measured on the test split through the real runtime (not torch); latency with the
protocol in :mod:`edgeopt.benchmark`, interleaved across all variants and the teacher (torch eager),
so every latency and every speedup in one evaluation is a same-run comparison.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import numpy as np
from pydantic import BaseModel

from edgeopt.artifacts import Checkpoint, Dataset, ModelArtifact
from edgeopt.benchmark import cpu_fingerprint, int8_warning, measure
from edgeopt.config import RUNTIMES_FOR_FORMAT, TargetConfig
from edgeopt.models import load_checkpoint
from edgeopt.runtimes import TorchPredictor, make_predictor

log = logging.getLogger(__name__)

TEACHER_EAGER = "teacher@torch-eager"


class VariantResult(BaseModel):
    variant: str
    status: str  # ok | failed
    reason: Optional[str] = None
    recipe: Dict[str, object] = {}
    lineage: Dict[str, Optional[str]] = {}
    metrics: Dict[str, float] = {}
    runtime_settings: Dict[str, object] = {}

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Evaluation(BaseModel):
    target: Dict[str, object]
    fingerprint: Dict[str, object]
    teacher: Dict[str, float]
    results: List[VariantResult]
    champion: Optional[VariantResult] = None
    champion_version: Optional[str] = None
    warnings: List[str] = []

    def result(self, variant: str) -> VariantResult:
        return next(r for r in self.results if r.variant == variant)

    def metrics_by_variant(self) -> Dict[str, Optional[dict]]:
        return {r.variant: (r.metrics if r.ok else None) for r in self.results}


def variant_name(model: ModelArtifact, runtime: str) -> str:
    return f"{model.variant}@{runtime}"


def evaluate_variants(
    models: List[ModelArtifact],
    runtimes: List[str],
    dataset: Dataset,
    teacher: Checkpoint,
    teacher_onnx: ModelArtifact,
    target: TargetConfig,
    champion: Optional[Tuple[ModelArtifact, str, str]] = None,
) -> Evaluation:
    """Accuracy, latency (p50/p95/p99, first inference), size and params of every (model, runtime).

    ``champion`` (model, registry version, runtime) is the current champion: it is measured in the
    same loop so that the challenger and it are compared on equal terms; it is not a candidate.
    """
    x_test, y_test = dataset.split("test")
    x_lat = np.ascontiguousarray(x_test[: target.batch])
    teacher_pred = TorchPredictor(load_checkpoint(teacher), target.threads)
    teacher_acc = float((teacher_pred.predict_batched(x_test).argmax(1) == y_test).mean())
    predictors: Dict[str, object] = {TEACHER_EAGER: teacher_pred}

    def measure_accuracy(name: str, m: ModelArtifact, rt: str) -> VariantResult:
        r = VariantResult(variant=name, status="ok", recipe={**m.manifest["recipe"], "runtime": rt},
                          lineage=m.manifest.get("lineage", {}))
        if m.failed:
            return r.model_copy(update={"status": "failed", "reason": m.manifest.get("reason")})
        try:
            p = make_predictor(rt, m.model_file, target.threads)
            acc = float((p.predict_batched(x_test).argmax(1) == y_test).mean())
        except Exception as err:  # a broken variant is recorded, not fatal
            log.warning("evaluate: %s failed: %s", name, err)
            return r.model_copy(update={"status": "failed", "reason": f"{type(err).__name__}: {err}"[:500]})
        predictors[name] = p
        return r.model_copy(update={"runtime_settings": p.settings, "metrics": {
            "accuracy": acc,
            "accuracy_drop": 100 * (teacher_acc - acc),
            "size_mb": m.model_bytes / 1e6,
            "params": float(m.manifest.get("params", 0)),
            "macs": float(m.manifest.get("macs", 0)),
        }})

    results = {
        variant_name(m, rt): measure_accuracy(variant_name(m, rt), m, rt)
        for m in models for rt in runtimes if rt in RUNTIMES_FOR_FORMAT[m.format]
    }
    champ = None
    if champion is not None:
        model, version, rt = champion
        champ = measure_accuracy(f"champion-v{version}:{variant_name(model, rt)}", model, rt)

    lat = measure(predictors, x_lat, warmup=target.warmup, iterations=target.iterations,
                  time_budget_s=target.time_budget_s)
    t_lat = lat[TEACHER_EAGER]
    teacher_bytes = teacher_onnx.model_bytes
    for r in [*results.values(), *([champ] if champ else [])]:
        if not r.ok:
            continue
        L = lat[r.variant]
        r.metrics.update({
            "latency_p50_ms": L.p50_ms, "latency_p95_ms": L.p95_ms, "latency_p99_ms": L.p99_ms,
            "latency_first_ms": L.first_ms, "latency_mean_ms": L.mean_ms, "latency_std_ms": L.std_ms,
            "speedup_vs_teacher": t_lat.p50_ms / L.p50_ms,
            "compression_ratio": teacher_bytes / (r.metrics["size_mb"] * 1e6),
        })
    fp = cpu_fingerprint()
    warnings = [w for w in [int8_warning(fp)] if w and any(r.recipe.get("scheme") == "int8" for r in results.values())]
    for w in warnings:
        log.warning("evaluate: %s", w)
    ok = sum(r.ok for r in results.values())
    log.info(
        "evaluate: %d variants (%d ok, %d failed) on %s, %d thread(s), batch %d; teacher acc %.4f p50 %.3f ms (torch eager)",
        len(results), ok, len(results) - ok, fp["cpu"], target.threads, target.batch, teacher_acc, t_lat.p50_ms,
    )
    return Evaluation(
        target=target.model_dump(mode="json"),
        fingerprint=fp,
        teacher={
            "accuracy": teacher_acc,
            "latency_p50_ms": t_lat.p50_ms,
            "latency_p95_ms": t_lat.p95_ms,
            "onnx_size_mb": teacher_bytes / 1e6,
            "params": float(teacher.manifest["params"]),
        },
        results=list(results.values()),
        champion=champ,
        champion_version=champion[1] if champion else None,
        warnings=warnings,
    )
