"""ONNX Runtime's quantization tools, shared by the int8 (static QDQ) and int8-dynamic recipes.

The defaults follow what ONNX Runtime's CPU provider really runs in INT8 on the CPU at hand:

- **activation type.** On x86 the provider fuses DequantizeLinear -> Conv -> QuantizeLinear into
  QLinearConv only for uint8 activations (U8S8): its QDQ selectors refuse int8 activations there
  (``QDQIsInt8Allowed()`` is false outside ARM), and it rewrites int8 to uint8 only where a tensor has
  one consumer, so a residual network quantized S8S8 keeps most convolutions in FP32 between Q/DQ
  pairs (ResNet-18, 1 thread, AVX512-VNNI: S8S8 fused 9 of 20 convolutions and ran 1.06x, U8S8 all
  20 and 2.7x). On ARM both types fuse and ONNX Runtime's guidance prefers symmetric int8. ``auto``
  therefore means uint8 on x86 (and on any other CPU), int8 on ARM.
- **reduce_range** (7-bit weights): U8S8 on x86 without VNNI multiplies with ``vpmaddubsw``, whose
  16-bit sums can saturate; VNNI (AVX512-VNNI, AVX-VNNI, AMX) and ARM have no such issue. ``auto``
  turns it on only on x86 without those instructions.

Both are resolved on the machine that quantizes and recorded in the recipe: a model quantized on a
VNNI machine for a target without VNNI should set ``reduce_range: true`` explicitly.
"""

from __future__ import annotations

import platform
import tempfile
from functools import cache
from pathlib import Path
from typing import Any, Dict, FrozenSet, Sequence, Tuple

import numpy as np

from edgeopt.config.quant import OrtOptions
from edgeopt.measure.latency import cpu_info

VNNI = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
AUTO_ACTIVATION = {"x86": "uint8", "arm": "int8"}  # other CPUs: uint8, the type every CPU kernel fuses

CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}  # CalibrationMethod
# The entropy (KL) search picks a threshold among the histogram's bins: quantize_static's own
# histogram (128 bins for 128 quantized bins) leaves it one candidate, the full range (= MinMax).
# 512 bins give it 193 candidates (TensorRT's 2048 give more, at 5x the search time).
CALIBRATOR_OPTIONS: Dict[str, Dict[str, Any]] = {
    "minmax": {},
    "entropy": {"num_bins": 512, "num_quantized_bins": 128},
    "percentile": {"num_bins": 2048, "percentile": 99.999},
}





@cache
def cpu() -> Tuple[str, FrozenSet[str]]:
    """(x86 | arm | other, the CPU's feature flags from /proc/cpuinfo; empty where it is unreadable)."""
    machine = platform.machine().lower()
    family = ("x86" if machine in ("x86_64", "amd64", "i386", "i686")
              else "arm" if machine.startswith(("arm", "aarch64")) else "other")
    return family, cpu_info()[1]


def activation_type(o: OrtOptions) -> str:
    return AUTO_ACTIVATION.get(cpu()[0], "uint8") if o.activation_type == "auto" else o.activation_type


def reduce_range(o: OrtOptions) -> bool:
    family, flags = cpu()
    return family == "x86" and not flags & VNNI if o.reduce_range == "auto" else o.reduce_range


def _resolved_on(o: OrtOptions, fields: Tuple[str, ...]) -> Dict[str, str]:
    """Where an ``auto`` was resolved, the CPU that resolved it (the recipe holds for CPUs like it)."""
    if all(getattr(o, f) != "auto" for f in fields):
        return {}
    family, flags = cpu()
    return {"resolved_for_cpu": f"{family}{' VNNI' if flags & VNNI else ''}"}


def static_recipe(o: OrtOptions, n_calibration: int) -> Tuple[Dict[str, Any], str]:
    act, rr = activation_type(o), reduce_range(o)
    used = {"calibration_samples": n_calibration, "quant_format": "QDQ", "weight_type": "int8",
            "calibrate_method": o.calibrate_method, "per_channel": o.per_channel, "activation_type": act,
            "reduce_range": rr, "calibrator_options": CALIBRATOR_OPTIONS[o.calibrate_method],
            **_resolved_on(o, ("activation_type", "reduce_range"))}
    method = (f"onnxruntime static QDQ {'U8S8' if act == 'uint8' else 'S8S8'}{' per-channel' if o.per_channel else ''} "
              f"{o.calibrate_method}{' reduce-range' if rr else ''}")
    return used, method


def dynamic_recipe(o: OrtOptions) -> Tuple[Dict[str, Any], str]:
    rr = reduce_range(o)
    used = {"weight_type": "int8", "per_channel": o.per_channel, "reduce_range": rr,
            "op_types": list(o.dynamic_op_types), **_resolved_on(o, ("reduce_range",))}
    method = (f"onnxruntime dynamic INT8 of {'/'.join(o.dynamic_op_types)}{' per-channel' if o.per_channel else ''}"
              f"{' reduce-range' if rr else ''}")
    return used, method


def input_name(path: Path) -> str:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return next(i.name for i in graph.input if i.name not in weights)


def preprocessed(src: Path, tmp: str) -> str:
    """ONNX Runtime's recommended shape inference and graph optimization before quantizing."""
    from onnxruntime.quantization import quant_pre_process

    pre = str(Path(tmp) / "pre.onnx")
    quant_pre_process(str(src), pre, skip_symbolic_shape=True)
    return pre


def calibrate(src: Path, cache_file: Path, calibration: np.ndarray, method: str = "minmax") -> Path:
    """ONNX Runtime calibration (minmax, entropy or percentile) of every tensor's range on
    ``calibration``, one image at a time (fixed-batch models take that), saved as ONNX Runtime's
    calibration cache (JSON) at ``cache_file``."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator, save_tensors_data

    name = input_name(src)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = ({name: calibration[i : i + 1]} for i in range(len(calibration)))

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(
            str(src), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=CalibrationMethod[CALIBRATION_METHODS[method]], extra_options=CALIBRATOR_OPTIONS[method],
        )
        calibrator.collect_data(Reader())
        save_tensors_data(calibrator.compute_data(), cache_file)
    return cache_file


def quantize_static_qdq(src: Path, dst: Path, calibration: np.ndarray, o: OrtOptions = OrtOptions(),
                        exclude: Sequence[str] = ()) -> Path:
    """ONNX Runtime static QDQ: INT8 weights, activations of :func:`activation_type`, ranges
    calibrated with ``o.calibrate_method`` on ``calibration`` (N x C x H x W float32); the nodes
    named in ``exclude`` stay in float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    act = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[activation_type(o)]
    with tempfile.TemporaryDirectory() as tmp:
        pre = preprocessed(src, tmp)
        cache_file = calibrate(Path(pre), Path(tmp) / "calibration.json", calibration, o.calibrate_method)
        quantize_static(
            pre, str(dst), None, quant_format=QuantFormat.QDQ, activation_type=act, weight_type=QuantType.QInt8,
            per_channel=o.per_channel, reduce_range=reduce_range(o),
            calibrate_method=CalibrationMethod[CALIBRATION_METHODS[o.calibrate_method]],
            calibration_cache_path=str(cache_file), nodes_to_exclude=list(exclude),
        )
    return dst


def quantize_dynamic_int8(src: Path, dst: Path, o: OrtOptions = OrtOptions()) -> Path:
    """ONNX Runtime dynamic quantization of ``o.dynamic_op_types``: INT8 weights, activations
    quantized at run time (no calibration)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        quantize_dynamic(preprocessed(src, tmp), str(dst), op_types_to_quantize=list(o.dynamic_op_types),
                         per_channel=o.per_channel, reduce_range=reduce_range(o), weight_type=QuantType.QInt8)
    return dst
