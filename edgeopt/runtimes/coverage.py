"""How much of a model a runtime really executes in INT8, read from the graph it runs.

A QDQ model says what *may* run in INT8; the runtime decides what does. ONNX Runtime fuses
DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv only where its kernels allow (on x86:
uint8 activations), and OpenVINO picks a kernel precision per layer. So the count is taken after
the runtime's own optimizations, with the same session settings as evaluation:

- onnxruntime: the optimized graph the session runs (``SessionOptions.optimized_model_filepath``):
  QLinearConv, QLinearMatMul, QGemm, ConvInteger, MatMulInteger, DynamicQuantizeMatMul,
  MatMulIntegerToFloat against the Conv / MatMul / Gemm (and their fused forms) left in float;
- openvino: the compiled model's runtime graph (``get_runtime_model()``): layers of type
  Convolution, Deconvolution, FullyConnected or MatMul by ``runtimePrecision`` (i8/u8 vs the rest);
- litert: the ``.tflite``'s operators (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, ...) by the type
  of their input (int8/uint8/int16 vs float): an INT8 LiteRT model has no float twin that XNNPACK
  could pick instead;
- executorch: the layers inside each XNNPACK delegate's graph by the data type of their input
  (qint8/quint8/qdint8 vs fp32/fp16), plus convolutions and matmuls left to the portable kernels (float);
  also ``delegated_fraction``, the share of the program's operations that XNNPACK runs.

Each costs one session, one compilation or one read of the file: cheap next to a latency measurement.
A new runtime adds its counter to ``COUNTERS``: (INT8 layers, float layers, any other figure).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Tuple

ORT_INT8 = frozenset({"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger",
                      "DynamicQuantizeMatMul", "MatMulIntegerToFloat"})
ORT_FLOAT = frozenset({"Conv", "FusedConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm", "FusedGemm"})
OV_LAYERS = frozenset({"Convolution", "Deconvolution", "FullyConnected", "MatMul"})
OV_INT8 = frozenset({"i8", "u8"})


Counts = Tuple[int, int, Dict[str, float]]


def _ort_counts(model_file: Path, threads: int) -> Counts:
    import onnx
    import onnxruntime as ort

    from edgeopt.runtimes.onnxruntime import session_options

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(threads)
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(model_file), so, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return sum(ops[k] for k in ORT_INT8), sum(ops[k] for k in ORT_FLOAT), {}


def _openvino_counts(model_file: Path, threads: int) -> Counts:
    from edgeopt.runtimes.openvino import OpenVINOPredictor

    layers: Counter = Counter()
    for op in OpenVINOPredictor(model_file, threads).compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in OV_LAYERS:
            layers[info["runtimePrecision"].astype(str) in OV_INT8] += 1
    return layers[True], layers[False], {}


def _litert_counts(model_file: Path, threads: int) -> Counts:
    from edgeopt.runtimes.litert import layers

    by_int8: Counter = Counter()
    for (_, int8), n in layers(model_file).items():
        by_int8[int8] += n
    return by_int8[True], by_int8[False], {}


def _executorch_counts(model_file: Path, threads: int) -> Counts:
    from edgeopt.runtimes.executorch import read_program

    program = read_program(model_file)
    return program.int8_layers, program.float_layers, {"delegated_fraction": program.delegated_fraction}


COUNTERS: Dict[str, Callable[[Path, int], Counts]] = {
    "onnxruntime": _ort_counts,
    "openvino": _openvino_counts,
    "litert": _litert_counts,
    "executorch": _executorch_counts,
}


def int8_coverage(runtime: str, model_file: Path, threads: int = 1) -> Dict[str, float]:
    """``int8_ops`` and ``float_ops`` (convolution / matmul layers ``runtime`` executes in INT8 or
    in floating point) and ``int8_fraction`` = int8_ops / both, for the model file (and any other figure
    the runtime's counter reads, e.g. ExecuTorch's ``delegated_fraction``)."""
    if runtime not in COUNTERS:
        raise ValueError(f"no INT8 coverage counter for runtime {runtime!r}; expected one of {', '.join(COUNTERS)}")
    int8, other, more = COUNTERS[runtime](Path(model_file), threads)
    return {"int8_ops": int8, "float_ops": other, "int8_fraction": int8 / (int8 + other) if int8 + other else 0.0,
            **more}
