"""Evaluate every variant on the runtime it will run on, all in one process and one harness.

Accuracy is measured through the real runtime (not torch) on the validation and the test split in
one pass (the val images, then the test images): ``accuracy`` and ``accuracy_drop`` are on validation,
what selection and promotion read; ``test_accuracy`` and ``test_accuracy_drop`` are reported, never
chosen on. Latency with the protocol in :mod:`edgeopt.measure.latency`, interleaved across every
variant, the reference (the brought or trained model in FP32 on the runtime that runs its ONNX file)
and the current champion, so every latency and every speedup in one evaluation is a same-run comparison.

Where the run names ``targets`` (devices with an agent), :mod:`edgeopt.agent.targets` sends the same
models to each device as one job, which runs the same protocol there
(:func:`edgeopt.measure.latency.measure_models`) and is assembled here into an :class:`Evaluation`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterator, List, Literal, Optional, Tuple

import numpy as np
from pydantic import BaseModel

from edgeopt.artifacts import Dataset, ModelArtifact
from edgeopt.config import TargetConfig
from edgeopt.measure.latency import ACCURACY_BATCH, Measured, cpu_fingerprint, int8_warning, measure_models

log = logging.getLogger(__name__)

# The accuracy inputs, in this order: the split selection reads (metrics "accuracy", "accuracy_drop"),
# then the split that is only reported ("test_accuracy", "test_accuracy_drop")
ACCURACY_SPLITS = ("val", "test")


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
    accuracy: float  # on the validation split, as every variant's "accuracy"
    latency_p50_ms: float
    latency_p95_ms: float
    size_mb: float
    params: float
    output: str = "logits"
    test_accuracy: float = math.nan  # reported beside it, never chosen on


class Evaluation(BaseModel):
    target: Dict[str, object]
    fingerprint: Dict[str, Any]
    reference: Reference
    results: List[VariantResult]
    champion: Optional[VariantResult] = None
    champion_version: Optional[str] = None
    warnings: List[str] = []
    device: Optional[Dict[str, Any]] = None  # the target device: label, url, job time, peak memory; None: this machine
    error: Optional[str] = None  # why the device measured nothing (its agent dropped or refused the job)
    others: List["Evaluation"] = []  # with several targets: the second and later ones (this is the first)

    @property
    def label(self) -> str:
        """The device's label, or 'local' for the machine that ran evaluate."""
        return str(self.device["label"]) if self.device else "local"

    @property
    def devices(self) -> List["Evaluation"]:
        """This evaluation and those of the other targets, in the config's order."""
        return [self, *self.others]

    def result(self, variant: str) -> VariantResult:
        return next(r for r in self.results if r.variant == variant)

    def metrics_by_variant(self) -> Dict[str, Optional[dict]]:
        return {r.variant: (r.metrics if r.ok else None) for r in self.results}


def variant_name(model: ModelArtifact, runtime: str) -> str:
    return f"{model.variant}@{runtime}"


# An exported model and the runtime to run it on
Source = Tuple[ModelArtifact, str]
# The current champion: its model, registry version and runtime
Champion = Tuple[ModelArtifact, str, str]


def evaluation_sources(models: List[ModelArtifact], evaluations: Dict[str, List[str]]) -> Dict[str, Source]:
    return {variant_name(m, rt): (m, rt) for m in models for rt in evaluations.get(m.variant, [])}


def champion_name(champion: Champion) -> str:
    model, version, rt = champion
    return f"champion-v{version}:{variant_name(model, rt)}"


def accuracy_inputs(dataset: Dataset) -> Iterator[np.ndarray]:
    """The accuracy stream every model runs over, here and on an agent: the validation images, then
    the test images (:data:`ACCURACY_SPLITS`), in batches of :data:`ACCURACY_BATCH`."""
    for split in ACCURACY_SPLITS:
        for x, _ in dataset.batches(split, ACCURACY_BATCH):
            yield x


def accuracy_labels(dataset: Dataset) -> Dict[str, np.ndarray]:
    """Each of :data:`ACCURACY_SPLITS`' labels, in the order :func:`accuracy_inputs` streams their images."""
    return {split: dataset.labels(split) for split in ACCURACY_SPLITS}


def latency_input(dataset: Dataset, batch: int) -> np.ndarray:
    """The batch every model is timed on: ``batch`` validation images (repeated where the split has fewer)."""
    x = next(dataset.batches("val", batch))[0]
    return np.ascontiguousarray(x if len(x) == batch else np.take(x, np.arange(batch) % len(x), axis=0))


def split_accuracies(predictions: np.ndarray, labels: Dict[str, np.ndarray]) -> Dict[str, float]:
    """``accuracy`` (validation) and ``test_accuracy`` from the predictions of the whole accuracy stream."""
    n_val = len(labels["val"])
    return {"accuracy": float((predictions[:n_val] == labels["val"]).mean()),
            "test_accuracy": float((predictions[n_val:] == labels["test"]).mean())}


def assemble(sources: Dict[str, Source], champion: Optional[Champion], measured: Dict[str, Measured],
              labels: Dict[str, np.ndarray], reference: str, target: TargetConfig, fingerprint: Dict[str, Any],
              refused: Dict[str, str], device: Optional[Dict[str, Any]] = None,
              error: Optional[str] = None) -> Evaluation:
    """Results of every (model, runtime) from what was measured on one machine: validation and test
    accuracy from the top-1 predictions over the accuracy stream (``labels``: split -> labels, in
    :data:`ACCURACY_SPLITS` order), latency and the speedups against the reference measured in the same loop."""

    def result(name: str, m: ModelArtifact, rt: str) -> VariantResult:
        r = VariantResult(variant=name, status="ok", recipe={**m.manifest["recipe"], "runtime": rt},
                          lineage=m.manifest.get("lineage", {}))
        if m.failed:
            return r.model_copy(update={"status": "failed", "reason": m.manifest.get("reason")})
        why = refused.get(name) or (measured[name].error if name in measured else error or "not measured")
        if why:
            log.warning("evaluate: %s failed %s: %s", name, where, why)
            return r.model_copy(update={"status": "failed", "reason": why})
        got = measured[name]
        assert got.predictions is not None and got.latency is not None
        if len(got.predictions) != n_inputs:
            return r.model_copy(update={"status": "failed", "reason": f"{len(got.predictions)} predictions for "
                                                                       f"{n_inputs} val and test images"})
        return r.model_copy(update={"runtime_settings": got.settings, "metrics": {
            **split_accuracies(got.predictions, labels),
            "size_mb": m.model_bytes / 1e6,
            "params": float(m.manifest.get("params", 0)),
            "macs": float(m.manifest.get("macs", 0)),
            **got.coverage,
        }})

    where = f"on {device['label']}" if device else "here"
    n_inputs = sum(len(y) for y in labels.values())
    results = {name: result(name, m, rt) for name, (m, rt) in sources.items()}
    champ = result(champion_name(champion), champion[0], champion[2]) if champion is not None else None
    ref_ok = reference in results and results[reference].ok
    if not ref_ok and device is None:
        why = results[reference].reason if reference in results else "it was not built"
        raise RuntimeError(f"the reference {reference} could not be measured: {why}")
    if not ref_ok:
        # a device that measured nothing usable: every candidate fails with the reason, the run goes on
        why = error or (results[reference].reason if reference in results else "it was not built")
        error = error or f"the reference {reference} could not be measured {where}: {why}"
        failed = {"status": "failed", "metrics": {}, "reason": f"the reference failed {where}: {why}"}
        results = {name: r if not r.ok else r.model_copy(update=failed) for name, r in results.items()}
        champ = champ if champ is None or not champ.ok else champ.model_copy(update=failed)
        nan = math.nan
        ref_model = Reference(variant=reference, accuracy=nan, test_accuracy=nan, latency_p50_ms=nan,
                              latency_p95_ms=nan, size_mb=nan, params=nan)
    else:
        ref, ref_lat = results[reference].metrics, measured[reference].latency
        assert ref_lat is not None
        for r in [*results.values(), *([champ] if champ else [])]:
            if not r.ok:
                continue
            L = measured[r.variant].latency
            assert L is not None
            r.metrics.update({
                "accuracy_drop": 100 * (ref["accuracy"] - r.metrics["accuracy"]),
                "test_accuracy_drop": 100 * (ref["test_accuracy"] - r.metrics["test_accuracy"]),
                "latency_p50_ms": L.p50_ms, "latency_p95_ms": L.p95_ms, "latency_p99_ms": L.p99_ms,
                "latency_first_ms": L.first_ms, "latency_mean_ms": L.mean_ms, "latency_std_ms": L.std_ms,
                "latency_noise_pct": L.noise_pct,
                "speedup_vs_reference": ref_lat.p50_ms / L.p50_ms,
                "compression_ratio": ref["size_mb"] / r.metrics["size_mb"],
            })
            parent = f"{r.lineage.get('parent')}@{r.recipe['runtime']}"  # a quantized variant's FP32 export
            if parent in results and results[parent].ok and parent != r.variant:
                r.metrics["speedup_vs_fp32"] = measured[parent].latency.p50_ms / L.p50_ms  # type: ignore[union-attr]
        ref_model = Reference(variant=reference, accuracy=ref["accuracy"], test_accuracy=ref["test_accuracy"],
                              latency_p50_ms=ref_lat.p50_ms,
                              latency_p95_ms=ref_lat.p95_ms, size_mb=ref["size_mb"], params=ref["params"],
                              output=sources[reference][0].manifest.get("output", "logits"))
    warnings = [w for w in [int8_warning(fingerprint)] if w and any(str(r.recipe.get("scheme", "")).startswith("int8")
                                                                     for r in results.values())]
    for w in warnings:
        log.warning("evaluate: %s", w)
    ok = sum(r.ok for r in results.values())
    log.info(
        "evaluate: %d variants (%d ok, %d failed) %s (%s, fingerprint %s), %d thread(s), batch %d; reference %s "
        "val acc %.4f test acc %.4f p50 %.3f ms", len(results), ok, len(results) - ok, where, fingerprint.get("cpu"),
        fingerprint.get("id"), target.threads, target.batch, reference, ref_model.accuracy, ref_model.test_accuracy,
        ref_model.latency_p50_ms,
    )
    return Evaluation(
        target=target.model_dump(mode="json"), fingerprint=fingerprint, reference=ref_model,
        results=list(results.values()), champion=champ, champion_version=champion[1] if champion else None,
        warnings=warnings, device=device, error=error,
    )


def protocol_settings(target: TargetConfig) -> Dict[str, Any]:
    """The latency protocol's settings, as measure_models takes them (here and in an agent's job)."""
    return {"threads": target.threads, "batch": target.batch, "warmup": target.warmup,
            "iterations": target.iterations, "time_budget_s": target.time_budget_s}


def runnable(sources: Dict[str, Source], champion: Optional[Champion]) -> Dict[str, Source]:
    run = {name: src for name, src in sources.items() if not src[0].failed}
    if champion is not None:
        run[champion_name(champion)] = (champion[0], champion[2])
    return run


def evaluate_variants(
    models: List[ModelArtifact],
    evaluations: Dict[str, List[str]],
    dataset: Dataset,
    reference: str,
    target: TargetConfig,
    champion: Optional[Champion] = None,
) -> Evaluation:
    """Accuracy (validation and test), latency (p50/p95/p99, first inference, noise), size, params, how much runs in INT8 and,
    for a quantized variant, its speedup over its own FP32 export on the same runtime, of every (model,
    runtime) named in ``evaluations`` (variant -> runtimes), relative to ``reference`` (``variant@runtime``),
    measured in this process.

    ``champion`` (model, registry version, runtime) is the current champion: it is measured in the
    same loop so that the challenger and it are compared on equal terms; it is not a candidate.
    """
    sources = evaluation_sources(models, evaluations)
    measured = measure_models(
        {name: (rt, m.model_file) for name, (m, rt) in runnable(sources, champion).items()},
        lambda: accuracy_inputs(dataset), latency_input(dataset, target.batch), **protocol_settings(target),
    )
    return assemble(sources, champion, measured, accuracy_labels(dataset), reference, target, cpu_fingerprint(), {})
