"""FP16: half-precision weights, half the file.

ONNX: the onnxruntime float16 converter, with float32 inputs and outputs (Cast nodes at the edges).
ONNX Runtime's CPU provider has few FP16 kernels on x86 and runs most of such a graph through
casts: FP16 ONNX is for GPUs and for size, rarely for CPU speed. OpenVINO IR: FP16 weight
compression; OpenVINO decompresses the weights at load and computes in the precision it is told
(edgeopt's runtime says f32), so the IR is smaller and computes as the FP32 one. LiteRT:
ai-edge-quantizer's float casting of the weights (FP16 weights dequantized where they are used:
smaller, computed in FP32). ExecuTorch: the program in half with float32 I/O, computed by XNNPACK's
FP16 kernels (``pt2e.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

from edgeopt.config.quant import RecipeOptions
from edgeopt.precisions import aeq, pt2e
from edgeopt.precisions.base import Inputs, Precision


def convert_onnx(src: Path, dst: Path, options: RecipeOptions, inputs: Inputs) -> Dict[str, Any]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    return {}


def convert_openvino(src: Path, dst: Path, options: RecipeOptions, inputs: Inputs) -> Dict[str, Any]:
    import openvino as ov

    from edgeopt.runtimes.openvino import ov_core

    ov.save_model(ov_core().read_model(str(src)), str(dst), compress_to_fp16=True)
    return {}


class FP16(Precision):
    name = "fp16"
    implementations = {"onnx": convert_onnx, "openvino": convert_openvino, "tflite": aeq.convert_fp16,
                       "tflite-nhwc": aeq.convert_fp16, "executorch": pt2e.convert_fp16}

    def recipe(self, fmt: str, options: RecipeOptions, n_calibration: int) -> Tuple[Dict[str, Any], str]:
        return {
            "onnx": ({"keep_io_types": True}, "onnxruntime float16 converter (float32 I/O)"),
            "openvino": ({"compress_to_fp16": True}, "OpenVINO FP16 weight compression"),
            "tflite": aeq.FP16_RECIPE,
            "tflite-nhwc": aeq.FP16_RECIPE,
            "executorch": pt2e.FP16_RECIPE,
        }[fmt]
