"""Which layers NNCF keeps in floating point, chosen by measurement on the CPU at hand (``auto``).

Keeping the first layer in float bought accuracy on depthwise models (``nncf_backend``) and cost
speed that depends on the CPU: ResNet-18 on OpenVINO, INT8 over FP32, every layer INT8 / the first
layer in float: 9.41x / 5.97x on an AMX Xeon, 3.22x / 2.70x on a VNNI-only Xeon, and on an AMD EPYC
with AVX512-VNNI 46.8 ms FP32, 13.3 / 15.7 ms. No fixed rule is right everywhere, so ``auto`` (in
``ignore_first``, and ``ignore_last`` where set) builds one candidate per combination of the auto
options, from one calibration pass (``nncf_backend.quantize_each``), measures each with the
evaluation protocol (``edgeopt.measure.latency.measure_models``: top-1 on at most ``auto_max_images``
images of the val split, then p50 latency with one thread, interleaved with the FP32 source, a short
run), and :func:`choose` keeps the fastest candidate whose val top-1 drop vs FP32 is within
``auto_max_drop`` points, else the most accurate. The manifest records every candidate's figures, the
winner, why, how many val images were scored, and the CPU.
An option set explicitly (true / false) is not measured. int8-acc reads ``auto`` as "quantize the
layer" (``nncf_backend.unmeasured``): its accuracy control reverts whatever costs accuracy.

Not measured on ONNX Runtime (int8 on ONNX), because no choice there trades speed for accuracy:
``activation_type: auto`` follows a fact of the CPU provider (it fuses QDQ convolutions on x86 only
with uint8 activations: S8S8 ran ResNet-18 1.16x over FP32, U8S8 3.08x), ``reduce_range: auto`` one
of the CPU's instructions (7-bit weights only where U8S8 sums can saturate, without VNNI), and
``per_channel`` costs no speed (ResNet-18 U8S8 on this EPYC, interleaved: 30.4 / 33.3 / 30.9 ms
per-channel vs 30.4 / 32.7 / 30.5 per-tensor), so it is an accuracy choice, true by default. Whether
ONNX Runtime or OpenVINO runs a model faster is measured anyway: every format x runtime is a
variant that evaluate measures on val and selection compares.
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np

from edgeopt.config.quant import NNCFOptions
from edgeopt.measure.latency import ACCURACY_BATCH, ISA_FLAGS, cpu_info
from edgeopt.precisions import nncf_backend
from edgeopt.precisions.base import Inputs

# The latency run: short (what it separates is 15 % here, 37 % on AMX), interleaved, one thread.
THREADS, WARMUP, ITERATIONS, ROUNDS = 1, 10, 50, 5
# Candidates within this much of the fastest, or within the run's own noise where that is larger,
# count as equally fast, and the one with fewer float layers wins among them: on a model whose
# candidates run at the same speed the choice then does not follow the noise.
SAME_SPEED_PCT = 2.0


@dataclass(frozen=True)
class Figures:
    """What :func:`choose` decides on, for one candidate."""

    p50_ms: float
    val_accuracy: float  # top-1 on the val split, 0..1
    noise_pct: float = 0.0  # the latency run's own noise (edgeopt.measure.latency.Latency.noise_pct)


def auto_fields(o: NNCFOptions) -> List[str]:
    return [f for f in nncf_backend.AUTO_FIELDS if getattr(o, f) == "auto"]


def candidate_name(o: NNCFOptions) -> str:
    kept = [side for side in ("first", "last") if getattr(o, f"ignore_{side}")]
    return f"{'+'.join(kept)}-float" if kept else "all-int8"


def candidates(o: NNCFOptions) -> Dict[str, NNCFOptions]:
    """One option set per combination of ``o``'s auto fields, fewest float layers first (the first
    layer before the last: its weights are the fewer)."""
    fields = auto_fields(o)
    combos = sorted(itertools.product((False, True), repeat=len(fields)), key=lambda c: (sum(c), c[::-1]))
    out = [o.model_copy(update=dict(zip(fields, combo))) for combo in combos]
    return {candidate_name(c): c for c in out}


def choose(fp32_accuracy: float, figures: Dict[str, Figures], max_drop: float,
           same_speed_pct: float = SAME_SPEED_PCT) -> Tuple[str, str]:
    """(the candidate to keep, why), from ``figures`` in order of preference (fewest float layers
    first): the fastest whose top-1 drop vs ``fp32_accuracy`` is at most ``max_drop`` points (of those
    within ``same_speed_pct`` % of it or the noise of either, the first), else the most accurate (of
    equals, the fastest)."""
    drop = {k: 100 * (fp32_accuracy - f.val_accuracy) for k, f in figures.items()}
    within = [k for k in figures if drop[k] <= max_drop + 1e-9]
    if within:
        fastest = min(within, key=lambda k: figures[k].p50_ms)
        tie = {k: max(same_speed_pct, figures[fastest].noise_pct, figures[k].noise_pct) for k in within}
        pick = next(k for k in within if figures[k].p50_ms <= figures[fastest].p50_ms * (1 + tie[k] / 100))
        why = (f"the fastest within the {max_drop:g}-point budget" if pick == fastest else
               f"as fast as {fastest}, the fastest within the {max_drop:g}-point budget (within {tie[pick]:.3g} %, "
               f"the larger of the run's noise and {same_speed_pct:g} %), with fewer float layers")
    else:
        pick = max(figures, key=lambda k: (figures[k].val_accuracy, -figures[k].p50_ms))
        why = f"none within the {max_drop:g}-point budget: the most accurate"
    seen = ", ".join(f"{k} {f.p50_ms:.3g} ms {100 * (f.val_accuracy - fp32_accuracy):+.2f} pt" for k, f in figures.items())
    return pick, f"{pick}: {why} ({seen}; FP32 {100 * fp32_accuracy:.2f} %)"


def cpu_text() -> str:
    """'AMD EPYC (avx2 avx512_vnni ...)': the CPU a choice was measured on, and its flags that matter."""
    model, flags = cpu_info()
    return f"{model} ({' '.join(f for f in ISA_FLAGS if f in flags) or 'no INT8/BF16 flags read'})"


def recipe(o: NNCFOptions, n_calibration: int) -> Dict[str, Any]:
    """The recipe's NNCF options; with auto fields, as set, with the budget, protocol and CPU."""
    used = nncf_backend.recipe(o, n_calibration)
    fields = auto_fields(o)
    if not fields:
        return used
    return {**used, **dict.fromkeys(fields, "auto"), "auto_max_drop": o.auto_max_drop,
            "auto_max_images": o.auto_max_images, "resolved_for_cpu": cpu_text(),
            "auto_protocol": f"val top-1 on at most {o.auto_max_images} images, p50 of {ITERATIONS} runs after "
                             f"{WARMUP} in {ROUNDS} interleaved rounds, {THREADS} thread"}


def method(o: NNCFOptions) -> str:
    fields = auto_fields(o)
    sides = "/".join(f.removeprefix("ignore_") for f in fields)
    return nncf_backend.method(o) + (f", {sides} layer in float only where this CPU's measurement needs it "
                                     f"(budget {o.auto_max_drop:g} points)" if fields else "")


def _val_batches(inputs: Inputs, labels: List[int], max_images: int) -> Iterator[np.ndarray]:
    """At most ``max_images`` val images (the whole split where it is no larger, else a sample seeded
    with the inputs' seed: the same on every call) in batches of ACCURACY_BATCH; ``labels`` is refilled
    with their labels."""
    labels.clear()
    sample = inputs.dataset.size("val") > max_images
    for x, y in inputs.dataset.batches("val", ACCURACY_BATCH, shuffle=sample, seed=inputs.seed, limit=max_images):
        labels.extend(int(v) for v in y)
        yield x


def measure(runtime: str, fp32: Path, files: Dict[str, Path], inputs: Inputs,
            max_images: int) -> Dict[str, Dict[str, Any]]:
    """The evaluation protocol on "fp32" and each of ``files``: val top-1 (on at most ``max_images``),
    agreement with FP32's top-1, INT8 coverage, p50 (ms) and the run's noise, in one interleaved latency loop."""
    from edgeopt.measure.latency import measure_models

    labels: List[int] = []
    got = measure_models({"fp32": (runtime, fp32), **{k: (runtime, f) for k, f in files.items()}},
                         lambda: _val_batches(inputs, labels, max_images), inputs.calibration[:1], threads=THREADS,
                         batch=1, warmup=WARMUP, iterations=ITERATIONS, rounds=ROUNDS)
    failed = {k: m.error for k, m in got.items() if m.error or m.latency is None}
    if failed:
        raise RuntimeError(f"measuring the INT8 candidates failed: {failed}")
    y, ref = np.asarray(labels), got["fp32"].predictions
    out = {}
    for k, m in got.items():
        assert m.predictions is not None and m.latency is not None
        out[k] = {"p50_ms": m.latency.p50_ms, "noise_pct": m.latency.noise_pct,
                  "val_accuracy": float((m.predictions == y).mean()) if len(y) else 0.0,
                  "agreement_with_fp32": float((m.predictions == ref).mean()) if len(y) else 1.0,
                  "int8_layers": m.coverage.get("int8_ops"), "float_layers": m.coverage.get("float_ops"),
                  "precision": m.settings.get("precision")}
    return out


def quantize(src: Path, dst: Path, fmt: str, inputs: Inputs, o: NNCFOptions,
             precision: str | None = None) -> Tuple[Dict[str, Any], Dict[str, Any] | None]:
    """NNCF PTQ of ``src`` into ``dst`` with ``o``'s auto fields chosen by measurement on this machine
    (candidates measured with ``precision`` as their inference hint, e.g. bf16; None: the file's own).
    Returns (what NNCF resolved for the winner, the choice: winner, why, every candidate's figures;
    None where nothing was auto, which is then not measured)."""
    options = candidates(o)
    backend = nncf_backend.BACKENDS[fmt]
    if len(options) == 1:
        return nncf_backend.quantize(src, dst, fmt, inputs.calibration, o), None
    built = dict(zip(options, nncf_backend.quantize_each(backend.load(src), fmt, inputs.calibration,
                                                         list(options.values()))))
    distinct: Dict[tuple, str] = {}  # a model too small to have a first and a last layer: one candidate
    for name, (_, resolved) in built.items():
        distinct.setdefault(tuple(resolved["ignored_layers"]), name)
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name in distinct.values():
            files[name] = Path(tmp) / name / f"model{src.suffix}"
            files[name].parent.mkdir()
            backend.save(built[name][0], files[name])
            if precision is not None:
                from edgeopt.runtimes.openvino import save_with_precision

                hinted = files[name].with_name(f"hinted{src.suffix}")
                save_with_precision(files[name], hinted, precision)
                files[name] = hinted
        figures = measure(backend.runtime, src, files, inputs, o.auto_max_images)
    fp32 = figures.pop("fp32")
    winner, why = choose(fp32["val_accuracy"], {k: Figures(f["p50_ms"], f["val_accuracy"], f["noise_pct"])
                                                for k, f in figures.items()}, o.auto_max_drop)
    backend.save(built[winner][0], dst)
    chosen = options[winner]
    return built[winner][1], {
        "winner": winner, "why": why, **{f: getattr(chosen, f) for f in auto_fields(o)},
        "max_drop_points": o.auto_max_drop, "val_images": min(o.auto_max_images, inputs.dataset.size("val")),
        "resolved_for_cpu": cpu_text(), "runtime": backend.runtime,
        "fp32": fp32, "candidates": {k: {**f, "drop_points": 100 * (fp32["val_accuracy"] - f["val_accuracy"]),
                                         "speedup_vs_fp32": fp32["p50_ms"] / f["p50_ms"],
                                         "ignored_layers": built[k][1]["ignored_layers"]} for k, f in figures.items()},
    }
