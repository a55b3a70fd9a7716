"""ONNX Runtime, CPU execution provider, sequential, fixed threads, all graph optimizations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeopt.runtimes import Predictor


def session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


class OrtPredictor(Predictor):
    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int = 1):
        self.session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.settings = {"threads": threads, "provider": "CPUExecutionProvider", "version": ort.__version__}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]
