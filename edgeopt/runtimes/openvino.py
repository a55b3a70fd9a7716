"""OpenVINO CPU with the LATENCY hint, one stream, fixed threads and an explicit precision.

OpenVINO silently runs FP32 models in bf16 on CPUs with AVX512_BF16/AMX unless told otherwise,
so the precision hint is always set and the precision the compiled model used is recorded.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import openvino as ov

from edgeopt.runtimes import Predictor


@cache
def ov_core() -> ov.Core:
    return ov.Core()


class OpenVINOPredictor(Predictor):
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
