"""Runtimes: one Predictor interface over ONNX Runtime, OpenVINO and torch eager.

A predictor is built for a fixed thread count (the target's) and maps a float32 NCHW batch to the
model's output. It records what it really ran with (``settings``), e.g. the precision OpenVINO
used. Each runtime is one module of this package; its heavy library is imported only when that
runtime is used, so the server (which never runs torch) does not load torch, and
``import edgeopt.runtimes`` costs nothing.

A new runtime is one module with a ``Predictor`` subclass and one line in ``RUNTIMES``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np

# runtime name -> "module:class" of its predictor (imported on first use)
RUNTIMES: Dict[str, str] = {
    "onnxruntime": "edgeopt.runtimes.onnxruntime:OrtPredictor",
    "openvino": "edgeopt.runtimes.openvino:OpenVINOPredictor",
}


class Predictor(ABC):
    runtime: str = ""
    settings: Dict[str, Any]
    fixed_batch: int | None = None  # a model exported with a static batch size takes exactly that many

    @abstractmethod
    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Outputs of one batch (of exactly ``fixed_batch`` rows when the model has one)."""

    def predict_batched(self, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
        """Outputs of any number of rows: split into the model's fixed batch (or ``batch_size``)."""
        step = self.fixed_batch or batch_size
        if len(x) == step or (self.fixed_batch is None and len(x) <= step):
            return self(x)
        out = []
        for i in range(0, len(x), step):
            chunk = x[i : i + step]
            if self.fixed_batch and len(chunk) < step:  # pad the last chunk to the fixed batch
                pad = np.zeros((step - len(chunk), *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            out.append(self(chunk)[: min(step, len(x) - i)])
        return np.concatenate(out)


def predictor_class(runtime: str) -> Callable[[Path, int], Predictor]:
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    module, _, cls = RUNTIMES[runtime].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_predictor(runtime: str, model_file: Path, threads: int = 1) -> Predictor:
    """A predictor of ``runtime`` for the model file, with ``threads`` inference threads."""
    return predictor_class(runtime)(Path(model_file), threads)
