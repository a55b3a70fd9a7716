"""INT8 by static post-training quantization, calibrated on train images.

ONNX: ONNX Runtime static QDQ (``ort.py``: U8S8 on x86, per-channel INT8 weights, MinMax); the same
file runs INT8 on OpenVINO too. OpenVINO IR: NNCF post-training quantization (``nncf_backend.py``:
mixed preset, CPU config, first and last layers kept in float).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

from pydantic import Field

from edgeopt.config.quant import NNCFOptions, OrtOptions, RecipeOptions
from edgeopt.precisions import nncf_backend, ort
from edgeopt.precisions.base import Inputs, Precision


class Int8Options(RecipeOptions):
    onnxruntime: OrtOptions = Field(OrtOptions(), description="ONNX Runtime static QDQ (ONNX).")
    nncf: NNCFOptions = Field(NNCFOptions(), description="NNCF post-training quantization (OpenVINO IR).")


def quantize_onnx(src: Path, dst: Path, options: Int8Options, inputs: Inputs) -> Dict[str, Any]:
    ort.quantize_static_qdq(src, dst, inputs.calibration, options.onnxruntime)
    return {}


def quantize_openvino(src: Path, dst: Path, options: Int8Options, inputs: Inputs) -> Dict[str, Any]:
    return {"nncf": nncf_backend.quantize(src, dst, "openvino", inputs.calibration, options.nncf)}


class Int8(Precision):
    name = "int8"
    Options = Int8Options
    implementations = {"onnx": quantize_onnx, "openvino": quantize_openvino}

    def recipe(self, fmt: str, options: Int8Options, n_calibration: int) -> Tuple[Dict[str, Any], str]:
        return {
            "onnx": lambda: ort.static_recipe(options.onnxruntime, n_calibration),
            "openvino": lambda: (nncf_backend.recipe(options.nncf, n_calibration),
                                 f"NNCF PTQ {nncf_backend.method(options.nncf)}"),
        }[fmt]()
