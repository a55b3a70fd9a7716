"""The format interface: what an exported model is on disk, what it is built from, who reads it."""

from __future__ import annotations

from abc import ABC
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Literal, Sequence, Tuple

if TYPE_CHECKING:
    from torch import nn

# What a format is built from: the FP32 ONNX file (ONNX, OpenVINO IR; a brought ONNX model as it is,
# a torch model exported once) or the torch module itself (formats whose converters take a torch
# program, as ExecuTorch's and LiteRT's do; a brought ONNX model through its torch conversion).
Source = Literal["onnx", "torch"]


class Format(ABC):
    name: ClassVar[str]
    source: ClassVar[Source] = "onnx"
    runtimes: ClassVar[Tuple[str, ...]]  # the runtimes that read this format; the first is its own
    model_filename: ClassVar[str]  # the file a runtime opens (others, like IR's .bin, sit beside it)

    def model_file(self, folder: Path) -> Path:
        return Path(folder) / self.model_filename

    @property
    def native_runtime(self) -> str:
        return self.runtimes[0]

    def from_onnx(self, onnx_file: Path, folder: Path) -> Path:
        """(source "onnx") Write this format's files for the FP32 ONNX model into ``folder``; return the model file."""
        raise NotImplementedError(f"format {self.name!r} is built from {self.source}, not from ONNX")

    def from_torch(self, model: "nn.Module", input_shape: Sequence[int], folder: Path) -> Path:
        """(source "torch") Write this format's files for the FP32 torch model into ``folder``; return the model file."""
        raise NotImplementedError(f"format {self.name!r} is built from {self.source}, not from torch")

    def describe(self, model_file: Path) -> Dict[str, Any]:
        """Facts about a written model worth keeping in its manifest (e.g. the ONNX opset)."""
        return {}
