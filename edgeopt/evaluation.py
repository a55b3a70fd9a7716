"""Evaluate every variant on the runtime it will run on, all in one process and one harness.

Accuracy is measured on the test split through the real runtime (not torch); latency with the
protocol in :mod:`edgeopt.benchmark`, interleaved across every variant, the reference (the brought
or trained model in FP32 on the runtime that runs its ONNX file) and the current champion, so every
latency and every speedup in one evaluation is a same-run comparison.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple

import numpy as np
from pydantic import BaseModel

from edgeopt.artifacts import Dataset, ModelArtifact
from edgeopt.benchmark import cpu_fingerprint, int8_warning, measure
from edgeopt.config import TargetConfig
from edgeopt.precisions.coverage import int8_coverage
from edgeopt.runtimes import Predictor, make_predictor

log = logging.getLogger(__name__)


class VariantResult(BaseModel):
    variant: str
    status: Literal["ok", "failed"]
    reason: Optional[str] = None
    recipe: Dict[str, object] = {}
    lineage: Dict[str, Optional[str]] = {}
    metrics: Dict[str, float] = {}
    runtime_settings: Dict[str, object] = {}

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Reference(BaseModel):
    """What every variant is compared with, measured in the same loop."""

    variant: str
    accuracy: float
    latency_p50_ms: float
    latency_p95_ms: float
    size_mb: float
    params: float
    output: str = "logits"


class Evaluation(BaseModel):
    target: Dict[str, object]
    fingerprint: Dict[str, Any]
    reference: Reference
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


def top1_accuracy(predictor: Predictor, dataset: Dataset, batch_size: int = 64) -> float:
    """Top-1 on the test split, streamed in batches (a model with a fixed batch takes its own)."""
    hits = sum(int((predictor.predict_batched(x).argmax(1) == y).sum()) for x, y in dataset.batches("test", batch_size))
    return hits / dataset.size("test")


def _timed(p: Predictor, batch: int) -> Callable[[np.ndarray], np.ndarray]:
    """What the latency loop calls: the predictor itself, or its batching when its fixed batch differs."""
    return p if p.fixed_batch in (None, batch) else p.predict_batched


def evaluate_variants(
    models: List[ModelArtifact],
    evaluations: Dict[str, List[str]],
    dataset: Dataset,
    reference: str,
    target: TargetConfig,
    champion: Optional[Tuple[ModelArtifact, str, str]] = None,
) -> Evaluation:
    """Accuracy, latency (p50/p95/p99, first inference, noise), size, params, how much runs in INT8 and,
    for a quantized variant, its speedup over its own FP32 export on the same runtime, of every (model,
    runtime) named in ``evaluations`` (variant -> runtimes), relative to ``reference`` (``variant@runtime``).

    ``champion`` (model, registry version, runtime) is the current champion: it is measured in the
    same loop so that the challenger and it are compared on equal terms; it is not a candidate.
    """
    x_lat = np.ascontiguousarray(next(dataset.batches("test", target.batch))[0])
    predictors: Dict[str, Predictor] = {}

    def measure_accuracy(name: str, m: ModelArtifact, rt: str) -> VariantResult:
        r = VariantResult(variant=name, status="ok", recipe={**m.manifest["recipe"], "runtime": rt},
                          lineage=m.manifest.get("lineage", {}))
        if m.failed:
            return r.model_copy(update={"status": "failed", "reason": m.manifest.get("reason")})
        try:
            p = make_predictor(rt, m.model_file, target.threads)
            acc = top1_accuracy(p, dataset)
            coverage = int8_coverage(rt, m.model_file, target.threads)
        except Exception as err:  # a broken variant is recorded, not fatal
            log.warning("evaluate: %s failed: %s", name, err)
            return r.model_copy(update={"status": "failed", "reason": f"{type(err).__name__}: {err}"[:500]})
        predictors[name] = p
        return r.model_copy(update={"runtime_settings": p.settings, "metrics": {
            "accuracy": acc,
            "size_mb": m.model_bytes / 1e6,
            "params": float(m.manifest.get("params", 0)),
            "macs": float(m.manifest.get("macs", 0)),
            **coverage,
        }})

    sources = {variant_name(m, rt): (m, rt) for m in models for rt in evaluations.get(m.variant, [])}
    results = {name: measure_accuracy(name, m, rt) for name, (m, rt) in sources.items()}
    if reference not in results or not results[reference].ok:
        why = results[reference].reason if reference in results else "it was not built"
        raise RuntimeError(f"the reference {reference} could not be measured: {why}")
    champ = None
    if champion is not None:
        model, version, rt = champion
        champ = measure_accuracy(f"champion-v{version}:{variant_name(model, rt)}", model, rt)

    lat = measure({k: _timed(p, target.batch) for k, p in predictors.items()}, x_lat, warmup=target.warmup,
                  iterations=target.iterations, time_budget_s=target.time_budget_s)
    ref, ref_lat = results[reference].metrics, lat[reference]
    for r in [*results.values(), *([champ] if champ else [])]:
        if not r.ok:
            continue
        L = lat[r.variant]
        r.metrics.update({
            "accuracy_drop": 100 * (ref["accuracy"] - r.metrics["accuracy"]),
            "latency_p50_ms": L.p50_ms, "latency_p95_ms": L.p95_ms, "latency_p99_ms": L.p99_ms,
            "latency_first_ms": L.first_ms, "latency_mean_ms": L.mean_ms, "latency_std_ms": L.std_ms,
            "latency_noise_pct": L.noise_pct,
            "speedup_vs_reference": ref_lat.p50_ms / L.p50_ms,
            "compression_ratio": ref["size_mb"] / r.metrics["size_mb"],
        })
        parent = f"{r.lineage.get('parent')}@{r.recipe['runtime']}"  # a quantized variant's FP32 export
        if parent in results and results[parent].ok and parent != r.variant:
            r.metrics["speedup_vs_fp32"] = lat[parent].p50_ms / L.p50_ms
    fp = cpu_fingerprint()
    warnings = [w for w in [int8_warning(fp)] if w and any(str(r.recipe.get("scheme", "")).startswith("int8")
                                                            for r in results.values())]
    for w in warnings:
        log.warning("evaluate: %s", w)
    ok = sum(r.ok for r in results.values())
    log.info(
        "evaluate: %d variants (%d ok, %d failed) on %s, %d thread(s), batch %d; reference %s acc %.4f p50 %.3f ms",
        len(results), ok, len(results) - ok, fp["cpu"], target.threads, target.batch, reference, ref["accuracy"],
        ref_lat.p50_ms,
    )
    return Evaluation(
        target=target.model_dump(mode="json"),
        fingerprint=fp,
        reference=Reference(variant=reference, accuracy=ref["accuracy"], latency_p50_ms=ref_lat.p50_ms,
                            latency_p95_ms=ref_lat.p95_ms, size_mb=ref["size_mb"], params=ref["params"],
                            output=sources[reference][0].manifest.get("output", "logits")),
        results=list(results.values()),
        champion=champ,
        champion_version=champion[1] if champion else None,
        warnings=warnings,
    )
