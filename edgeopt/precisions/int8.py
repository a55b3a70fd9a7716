"""INT8 by static post-training quantization, calibrated on train images.

ONNX: ONNX Runtime static QDQ (``ort.py``: U8S8 on x86, per-channel INT8 weights, MinMax); the same
file runs INT8 on OpenVINO too. OpenVINO IR: NNCF post-training quantization (``nncf_backend.py``:
mixed preset, CPU config, full bias correction; whether the first layer stays in float is measured
on this CPU, ``int8_choice.py``). LiteRT: ai-edge-quantizer's ``static_wi8_ai8`` on the FP32 ``.tflite``
(``aeq.py``). ExecuTorch: PT2E with the XNNPACKQuantizer from the torch program beside the ``.pte`` (``pt2e.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

from pydantic import Field

from edgeopt.config.quant import NNCFOptions, OrtOptions, RecipeOptions
from edgeopt.precisions import aeq, int8_choice, ort, pt2e
from edgeopt.precisions.base import Inputs, Precision


class Int8Options(RecipeOptions):
    onnxruntime: OrtOptions = Field(OrtOptions(), description="ONNX Runtime static QDQ (ONNX).")
    nncf: NNCFOptions = Field(NNCFOptions(), description="NNCF post-training quantization (OpenVINO IR).")


def quantize_onnx(src: Path, dst: Path, options: Int8Options, inputs: Inputs) -> Dict[str, Any]:
    ort.quantize_static_qdq(src, dst, inputs.calibration, options.onnxruntime)
    return {}


def quantize_openvino(src: Path, dst: Path, options: Int8Options, inputs: Inputs,
                      precision: str | None = None) -> Dict[str, Any]:
    """``precision``: the inference hint the auto candidates are measured with (int8-bf16: bf16)."""
    resolved, choice = int8_choice.quantize(src, dst, "openvino", inputs, options.nncf, precision)
    return {"nncf": resolved, **({"int8_choice": choice} if choice else {})}


class Int8(Precision):
    name = "int8"
    Options = Int8Options
    implementations = {"onnx": quantize_onnx, "openvino": quantize_openvino, "tflite": aeq.quantize_int8,
                       "tflite-nhwc": aeq.quantize_int8, "executorch": pt2e.quantize_int8}

    def recipe(self, fmt: str, options: Int8Options, n_calibration: int) -> Tuple[Dict[str, Any], str]:
        return {
            "onnx": lambda: ort.static_recipe(options.onnxruntime, n_calibration),
            "openvino": lambda: (int8_choice.recipe(options.nncf, n_calibration),
                                 f"NNCF PTQ {int8_choice.method(options.nncf)}"),
            "tflite": lambda: aeq.int8_recipe(n_calibration),
            "tflite-nhwc": lambda: aeq.int8_recipe(n_calibration),
            "executorch": lambda: pt2e.int8_recipe(n_calibration),
        }[fmt]()
