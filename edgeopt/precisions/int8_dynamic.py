"""INT8 by ONNX Runtime dynamic quantization: INT8 weights, activations quantized at run time from
their own range (no calibration). An ONNX Runtime technique, for ONNX only; it pays on MatMul
(transformers, recurrent nets), not on convolutions (``ort.OrtOptions.dynamic_op_types``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

from pydantic import Field

from edgeopt.config.quant import OrtOptions, RecipeOptions
from edgeopt.precisions import ort
from edgeopt.precisions.base import Inputs, Precision


class Int8DynamicOptions(RecipeOptions):
    onnxruntime: OrtOptions = Field(OrtOptions(), description="per_channel, reduce_range and dynamic_op_types apply.")


def quantize_onnx(src: Path, dst: Path, options: Int8DynamicOptions, inputs: Inputs) -> Dict[str, Any]:
    ort.quantize_dynamic_int8(src, dst, options.onnxruntime)
    return {}


class Int8Dynamic(Precision):
    name = "int8-dynamic"
    Options = Int8DynamicOptions
    implementations = {"onnx": quantize_onnx}

    def recipe(self, fmt: str, options: Int8DynamicOptions, n_calibration: int) -> Tuple[Dict[str, Any], str]:
        return ort.dynamic_recipe(options.onnxruntime)
