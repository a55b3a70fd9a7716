"""Runtimes: one Predictor interface over ONNX Runtime, OpenVINO, LiteRT, ExecuTorch and torch eager.

A predictor is built for a fixed thread count (the target's) and maps a float32 NCHW batch to the
model's output. It records what it really ran with (``settings``), e.g. the precision OpenVINO
used. Each runtime is one module of this package; its heavy library is imported only when that
runtime is used, so the server (which never runs torch) does not load torch, and
``import edgeopt.runtimes`` costs nothing.

A new runtime is one module with a ``Predictor`` subclass and one line in ``RUNTIMES`` (and one in
``PACKAGES`` where its Python package is not named like it).
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import numpy as np

# runtime name -> "module:class" of its predictor (imported on first use)
RUNTIMES: Dict[str, str] = {
    "onnxruntime": "edgeopt.runtimes.onnxruntime:OrtPredictor",
    "openvino": "edgeopt.runtimes.openvino:OpenVINOPredictor",
    "litert": "edgeopt.runtimes.litert:LiteRTPredictor",
    "executorch": "edgeopt.runtimes.executorch:ExecuTorchPredictor",
}
# runtime name -> (the module it imports, the distribution that installs it) where they are not its name:
# an edge agent offers the runtimes whose module it finds, and its fingerprint records their versions
PACKAGES: Dict[str, Tuple[str, str]] = {"litert": ("ai_edge_litert", "ai-edge-litert")}


def installed(runtime: str) -> bool:
    """Whether this Python has the runtime's package (found, not imported)."""
    try:
        return importlib.util.find_spec(PACKAGES.get(runtime, (runtime, runtime))[0]) is not None
    except ImportError:  # a finder that refuses it outright
        return False


def distribution(runtime: str) -> str:
    """The name of the runtime's Python distribution (for its version)."""
    return PACKAGES.get(runtime, (runtime, runtime))[1]


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
