"""LiteRT (TensorFlow Lite): ``ai_edge_litert``'s Interpreter with XNNPACK (its default delegate).

No torch: ``ai-edge-litert`` alone (about 22 MB) is what a device installs to run a ``.tflite``.
The predictor takes edgeopt's float32 NCHW batch whatever the file wants:

- a file with int8 input and output tensors (ai-edge-quantizer's default, no QUANTIZE/DEQUANTIZE op
  inside; edgeopt's INT8 recipe keeps float32 I/O unless asked) gets its input quantized with the
  input tensor's scale and zero point, and its output dequantized with the output's;
- a file converted with NHWC input (``tflite-nhwc``, what Android apps feed; its input is named
  ``*nhwc``) gets the batch transposed to NHWC;
- a file with a static batch (the converter's batch 1) runs that batch (``fixed_batch``).

:func:`layers` reads the file's operators with their operand types (before any delegate): the INT8
coverage of a ``.tflite``.
"""

from __future__ import annotations

from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any, Dict

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from edgeopt.runtimes import Predictor

LAYERS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "BATCH_MATMUL", "CONV_3D"})
INTEGER = (np.int8, np.uint8, np.int16)


def is_nhwc(detail: Dict[str, Any]) -> bool:
    return str(detail["name"]).lower().endswith("nhwc")


class LiteRTPredictor(Predictor):
    runtime = "litert"

    def __init__(self, path: Path, threads: int = 1):
        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        batch = int(self.input["shape_signature"][0])
        self.fixed_batch = batch if batch > 0 else None
        self.nhwc = is_nhwc(self.input)
        self.settings = {"threads": threads, "delegate": "XNNPACK", "layout": "NHWC" if self.nhwc else "NCHW",
                         "io": np.dtype(self.input["dtype"]).name, "version": version("ai-edge-litert")}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.nhwc:
            x = x.transpose(0, 2, 3, 1)
        if tuple(x.shape) != tuple(self.input["shape"]):
            self.interpreter.resize_tensor_input(self.input["index"], list(x.shape))
            self.interpreter.allocate_tensors()
            self.input = self.interpreter.get_input_details()[0]
        self.interpreter.set_tensor(self.input["index"], quantize(x, self.input))
        self.interpreter.invoke()
        return dequantize(self.interpreter.get_tensor(self.output["index"]), self.output)


def quantize(x: np.ndarray, detail: Dict[str, Any]) -> np.ndarray:
    """A float batch as the input tensor takes it: as it is, or quantized with its scale and zero point."""
    dtype = np.dtype(detail["dtype"])
    if not np.issubdtype(dtype, np.integer):
        return np.ascontiguousarray(x, dtype)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)


def dequantize(y: np.ndarray, detail: Dict[str, Any]) -> np.ndarray:
    if not np.issubdtype(np.dtype(detail["dtype"]), np.integer):
        return y.astype(np.float32, copy=True)
    scale, zero = detail["quantization"]
    return ((y.astype(np.float32) - zero) * scale).astype(np.float32)


def layers(path: Path) -> Counter:
    """The file's layers (convolutions, fully connected, batch matmuls) by (operator, integer input)."""
    it = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    return Counter((op["op_name"], bool(op["operand_types"]) and op["operand_types"][0] in INTEGER)
                   for op in it._get_ops_details() if op["op_name"] in LAYERS)
