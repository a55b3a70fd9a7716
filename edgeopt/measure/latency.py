"""The latency protocol, close to OpenVINO's benchmark_app, for every runtime alike.

- the first inference is timed and reported apart (it includes lazy initialisation);
- ``warmup`` untimed inferences follow;
- ``iterations`` timed inferences are taken in interleaved rounds across all models, so that a
  slow drift of the machine (another job, frequency scaling) hits every model alike;
- median, p95, p99, mean and std in milliseconds, at a fixed batch and thread count;
- every number carries the fingerprint of the CPU and runtimes it was measured on.

:func:`measure_models` is the whole protocol for a set of model files (top-1 predictions on the
accuracy inputs, INT8 coverage, then the interleaved latency loop): ``evaluate`` runs it in its own
process, and an edge agent (:mod:`edgeopt.agent`) runs the very same function on the device. This
module and :mod:`edgeopt.runtimes` import no torch, so the agent installs without it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Sequence, Tuple

import numpy as np

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "asimddp")
# the packages whose versions a fingerprint records, where installed
RUNTIME_PACKAGES = ("onnxruntime", "openvino", "ai-edge-litert", "executorch", "torch")
ACCURACY_BATCH = 64  # accuracy inputs are run in batches of this many rows, locally and on an agent


@dataclass
class Latency:
    first_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    iterations: int
    noise_pct: float  # half the spread of the per-round medians, in % of the median: the run's own noise


def cpu_info() -> Tuple[str, FrozenSet[str]]:
    """(CPU model name, feature flags) from /proc/cpuinfo; the flags are empty where it is unreadable."""
    model, flags = platform.processor() or "unknown", frozenset[str]()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = val.strip()
                elif key in ("flags", "Features"):
                    flags = frozenset(val.split())
                    break
    except OSError:
        pass
    return model, flags


def cpu_fingerprint(packages: Sequence[str] = RUNTIME_PACKAGES) -> Dict[str, Any]:
    """CPU model, core count, ISA flags that matter for INT8/BF16, the versions of those of ``packages``
    that are installed (read from their metadata: nothing is imported), and a short id of it all."""
    model, flags = cpu_info()
    fp: Dict[str, Any] = {
        "cpu": model,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "isa": sorted(f for f in ISA_FLAGS if f in flags),
    }
    for name in packages:
        try:
            fp[name] = version(name)
        except PackageNotFoundError:
            continue
    fp["id"] = hashlib.sha256(repr(sorted(fp.items())).encode()).hexdigest()[:12]
    return fp


def versions_text(fp: Dict[str, Any]) -> str:
    """'onnxruntime 1.32.0, openvino 2026.4.1' for the runtime packages a fingerprint records."""
    return ", ".join(f"{name} {fp[name]}" for name in RUNTIME_PACKAGES if name in fp)


def int8_warning(fingerprint: Dict[str, Any]) -> str | None:
    """Why INT8 may not pay on this CPU, or None when it has the dot-product instructions."""
    isa = set(fingerprint.get("isa", []))
    if isa & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"}:
        return None
    return (
        f"CPU {fingerprint.get('cpu')} has no VNNI/AMX (x86) or dot-product (ARM) instructions: "
        "INT8 kernels gain little or nothing over FP32 here (expect ~1.0-1.8x, sometimes a slowdown)"
    )


def _summary(first: float, rounds: List[List[float]]) -> Latency:
    a = np.concatenate([np.asarray(r) for r in rounds]) * 1e3
    p50 = float(np.percentile(a, 50))
    medians = [1e3 * float(np.median(r)) for r in rounds]
    return Latency(
        first_ms=first * 1e3,
        p50_ms=p50,
        p95_ms=float(np.percentile(a, 95)),
        p99_ms=float(np.percentile(a, 99)),
        mean_ms=float(a.mean()),
        std_ms=float(a.std()),
        iterations=len(a),
        noise_pct=100 * (max(medians) - min(medians)) / 2 / p50 if p50 > 0 else 0.0,
    )


def measure(predictors: Dict[str, Callable[[np.ndarray], Any]], x: np.ndarray, warmup: int = 20, iterations: int = 200,
            rounds: int = 5, time_budget_s: float | None = None) -> Dict[str, Latency]:
    """Latency of each predictor on the same input ``x``, interleaved over ``rounds``.

    Each model gets ``iterations`` timed inferences, or, with ``time_budget_s``, as many as fit in
    that many seconds (at least one per round).
    """
    first: Dict[str, float] = {}
    samples: Dict[str, List[List[float]]] = {k: [] for k in predictors}
    for name, p in predictors.items():
        t = time.perf_counter()
        p(x)
        first[name] = time.perf_counter() - t
        for _ in range(warmup):
            p(x)
    per_round = max(1, iterations // rounds)
    for _ in range(rounds):
        for name, p in predictors.items():
            s: List[float] = []
            samples[name].append(s)
            deadline = None if time_budget_s is None else time.perf_counter() + time_budget_s / rounds
            n = 0
            while (n < per_round) if deadline is None else (n == 0 or time.perf_counter() < deadline):
                t = time.perf_counter()
                p(x)
                s.append(time.perf_counter() - t)
                n += 1
    return {k: _summary(first[k], samples[k]) for k in predictors}


@dataclass
class Measured:
    """What one model did: its top-1 class per accuracy input, how much of it the runtime executes in
    INT8, the settings it ran with and its latency; or, when it could not be loaded or run, why."""

    predictions: np.ndarray | None = None
    coverage: Dict[str, float] = field(default_factory=dict)
    settings: Dict[str, Any] = field(default_factory=dict)
    latency: Latency | None = None
    error: str | None = None


def measure_models(models: Dict[str, Tuple[str, Path]], inputs: Callable[[], Iterable[np.ndarray]], x: np.ndarray, *,
                   threads: int, batch: int, warmup: int, iterations: int, time_budget_s: float | None = None,
                   rounds: int = 5) -> Dict[str, Measured]:
    """The evaluation protocol for ``models`` (key -> (runtime, model file)) on this machine.

    Each model is loaded with ``threads`` inference threads, run over ``inputs()`` (batches of
    normalized images) for its top-1 predictions, and its INT8 coverage is read from the graph its
    runtime runs; then every model that loaded is timed on ``x`` in one interleaved loop
    (:func:`measure`). A model that fails is recorded with its reason and the others go on.
    """
    from edgeopt.runtimes import make_predictor
    from edgeopt.runtimes.coverage import int8_coverage

    out: Dict[str, Measured] = {}
    predictors = {}
    for key, (runtime, path) in models.items():
        try:
            p = make_predictor(runtime, path, threads)
            predictions = np.concatenate([p.predict_batched(b).argmax(1) for b in inputs()]).astype(np.int32)
            coverage = int8_coverage(runtime, path, threads)
        except Exception as err:  # a broken model is recorded, not fatal
            out[key] = Measured(error=f"{type(err).__name__}: {err}".splitlines()[0][:500])
            continue
        predictors[key] = p
        out[key] = Measured(predictions=predictions, coverage=coverage, settings=p.settings)
    # what the loop calls: the predictor itself, or its batching where its fixed batch differs from ``batch``
    timed: Dict[str, Callable[[np.ndarray], Any]] = {
        k: (p if p.fixed_batch in (None, batch) else p.predict_batched) for k, p in predictors.items()
    }
    for k, lat in measure(timed, x, warmup=warmup, iterations=iterations, rounds=rounds,
                          time_budget_s=time_budget_s).items():
        out[k].latency = lat
    return out
