"""LiteRT's INT8 and FP16: ai-edge-quantizer on the FP32 ``.tflite``, in the converter environment.

The file is quantized as it is (no torch needed), file in, file out, like the ONNX and IR recipes:

- INT8: its ``static_wi8_ai8`` recipe: INT8 weights, symmetric per output channel; INT8 activations
  (asymmetric, per tensor), calibrated on the recipe's images (each tensor's widest range over them, as
  ONNX Runtime's MinMax; not the tool's moving average, which clips the top logits). The tool makes the
  input and output tensors int8; here they stay float32, with QUANTIZE / DEQUANTIZE ops inside the model,
  so every variant takes the same float32 input and the runtime converts it in C++ (on the digits
  student, numpy's conversion took 7 of the predictor's 15 us, slower than FP32's 8 us; inside, 6 us in
  all). The LiteRT predictor takes int8 I/O as well (``tflite.quantize(..., int8_io=True)``).
  Chosen over litert-torch's PT2E quantizer: the same scheme from the file itself, and on the digits
  CNN of the research note it kept FP32's accuracy (98.24 %) where PT2E lost 0.26 pt;
- FP16: float casting of the weights to FP16, dequantized where they are used (half the file,
  computed in FP32, as the ONNX and IR ``fp16`` recipes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

from edgeopt.formats import tflite
from edgeopt.precisions.base import Inputs

FP16_RECIPE: Tuple[Dict[str, Any], str] = ({"weights": "fp16", "compute": "fp32"},
                                           "LiteRT FP16 weights (ai-edge-quantizer float casting)")
INT8_METHOD = "LiteRT static INT8 (ai-edge-quantizer static_wi8_ai8, per-channel weights, float32 I/O)"


def int8_recipe(n_calibration: int) -> Tuple[Dict[str, Any], str]:
    return ({"quantizer": "ai-edge-quantizer static_wi8_ai8", "weights": "int8 symmetric per-channel",
             "activations": "int8 asymmetric per-tensor", "io": "float32", "calibration_samples": n_calibration},
            INT8_METHOD)


def quantize_int8(src: Path, dst: Path, options: Any, inputs: Inputs) -> Dict[str, Any]:
    tflite.quantize(src, dst, "int8", inputs.calibration)
    return {}


def convert_fp16(src: Path, dst: Path, options: Any, inputs: Inputs) -> Dict[str, Any]:
    tflite.quantize(src, dst, "fp16")
    return {}
