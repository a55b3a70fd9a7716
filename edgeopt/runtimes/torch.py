"""torch eager, and the bridge the other way: an ONNX model behind the nn.Module interface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeopt.runtimes import Predictor
from edgeopt.runtimes.onnxruntime import OrtPredictor


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


class OnnxModule(nn.Module):
    """An ONNX model run by ONNX Runtime behind the nn.Module interface (inference only), so a model
    brought as ONNX can teach a student and be measured like a torch one. A model exported with a
    fixed batch (often 1) is fed that many rows at a time."""

    def __init__(self, path: Path, threads: int = 0):
        super().__init__()
        self.predictor = OrtPredictor(path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.predictor.predict_batched(a, batch_size=max(1, len(a))))
