"""One Predictor interface over ONNX Runtime, OpenVINO and torch eager.

A predictor is built for a fixed thread count (the target's) and maps a float32 NCHW batch to
logits. Each records what it really ran with (``settings``), e.g. the precision OpenVINO used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import numpy as np
import onnxruntime as ort
import openvino as ov
import torch
from torch import nn


class Predictor:
    runtime: str = ""
    settings: Dict[str, Any]
    fixed_batch: int | None = None  # a model exported with a static batch size takes exactly that many

    def __call__(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_batched(self, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
        step = self.fixed_batch or batch_size
        return np.concatenate([self(x[i : i + step]) for i in range(0, len(x), step)])


class OrtPredictor(Predictor):
    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int = 1):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.settings = {"threads": threads, "provider": "CPUExecutionProvider", "version": ort.__version__}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


_CORE: ov.Core | None = None


def ov_core() -> ov.Core:
    global _CORE
    if _CORE is None:
        _CORE = ov.Core()
    return _CORE


class OpenVINOPredictor(Predictor):
    """OpenVINO CPU with the LATENCY hint, one stream, fixed threads and an explicit precision.

    OpenVINO silently runs FP32 models in bf16 on CPUs with AVX512_BF16/AMX unless told otherwise,
    so the precision hint is always set and the precision the compiled model used is recorded.
    """

    runtime = "openvino"

    def __init__(self, path: Path, threads: int = 1, precision: str = "f32"):
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1",
            "INFERENCE_NUM_THREADS": str(threads),
            "INFERENCE_PRECISION_HINT": precision,
        }
        self.compiled = ov_core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        batch = self.compiled.input(0).get_partial_shape()[0]
        self.fixed_batch = batch.get_length() if batch.is_static else None
        self.settings = {
            "threads": threads,
            "hint": "LATENCY",
            "streams": 1,
            "precision": self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
            "version": ov.get_version(),
        }

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.request.infer({0: x})[0].copy()


class TorchPredictor(Predictor):
    runtime = "torch"

    def __init__(self, model: nn.Module, threads: int = 1):
        self.model = model.eval()
        self.threads = threads
        self.settings = {"threads": threads, "mode": "eager", "version": torch.__version__}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        prev = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                return self.model(torch.from_numpy(x)).numpy()
        finally:
            torch.set_num_threads(prev)


def make_predictor(runtime: str, model_file: Path, threads: int = 1) -> Predictor:
    if runtime == "onnxruntime":
        return OrtPredictor(model_file, threads)
    if runtime == "openvino":
        return OpenVINOPredictor(model_file, threads)
    raise ValueError(f"unknown runtime {runtime!r}; expected onnxruntime or openvino")

