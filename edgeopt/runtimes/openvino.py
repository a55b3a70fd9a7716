"""OpenVINO CPU with the LATENCY hint, one stream, fixed threads and an explicit precision.

OpenVINO silently runs FP32 models in bf16 on CPUs with AVX512_BF16/AMX unless told otherwise,
so the precision hint is always set: the one the model file carries in its rt_info
(``runtime_options/INFERENCE_PRECISION_HINT``, written by the bf16, fp16-native and int8-bf16
recipes with :func:`save_with_precision`), else f32. OpenVINO itself does not apply that rt_info
entry at ``compile_model`` (2026.4, tried: a file carrying f32 still compiled to bf16 here), so this
predictor does, and every consumer (evaluate, the edge agent, the server) compiles a variant alike.
``settings`` records the hint asked and the precision the compiled model really used (a CPU without
native f16 compiles an f16 hint to bf16 or f32).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import openvino as ov

from edgeopt.runtimes import Predictor

DEFAULT_PRECISION = "f32"  # for files that carry no hint: the FP32 the file says, never OpenVINO's silent bf16
HINT_RT_INFO = ["runtime_options", "INFERENCE_PRECISION_HINT"]  # where a model file carries its precision


@cache
def ov_core() -> ov.Core:
    return ov.Core()


def file_precision(model: ov.Model) -> str | None:
    """The inference precision hint the model carries in its rt_info, or None."""
    return model.get_rt_info(HINT_RT_INFO).astype(str) if model.has_rt_info(HINT_RT_INFO) else None


def save_with_precision(src: Path, dst: Path, precision: str, fp16_weights: bool = False) -> None:
    """The IR (or any file OpenVINO reads) at ``src`` written as an IR at ``dst`` that carries
    ``precision`` (f32, bf16, f16) as its inference precision hint; its float weights stored in FP16
    where ``fp16_weights`` (OpenVINO's weight compression), else as they are."""
    model = ov_core().read_model(str(src))
    model.set_rt_info(precision, HINT_RT_INFO)
    ov.save_model(model, str(dst), compress_to_fp16=fp16_weights)


class OpenVINOPredictor(Predictor):
    runtime = "openvino"

    def __init__(self, path: Path, threads: int = 1, precision: str | None = None):
        """``precision``: the inference precision hint; None: the file's own, else f32."""
        model = ov_core().read_model(str(path))
        hint = precision or file_precision(model) or DEFAULT_PRECISION
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1",
            "INFERENCE_NUM_THREADS": str(threads),
            "INFERENCE_PRECISION_HINT": hint,
        }
        self.compiled = ov_core().compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        batch = self.compiled.input(0).get_partial_shape()[0]
        self.fixed_batch = batch.get_length() if batch.is_static else None
        self.settings = {
            "threads": threads,
            "hint": "LATENCY",
            "streams": 1,
            "precision": self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),  # what it really used
            "precision_hint": hint,
            "version": ov.get_version(),
        }

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.request.infer({0: x})[0].copy()
