"""Formats: what an exported model is on disk, and which runtimes read it.

A format is one module with a :class:`Format` subclass: its file names, how to write it from an
FP32 ONNX file (every model reaches its formats through ONNX: torch exports to ONNX once, a brought
model often is ONNX already), what to record about a file, and the runtimes that can run it.
Which precisions apply to a format is said by the precision recipes (``edgeopt.precisions``),
each of which names the formats it has an implementation for. A new format is one module here
plus one entry in ``FORMATS``: no ``format == "onnx"`` test lives anywhere else.

The modules import their heavy libraries inside their methods, so the config can list formats
without importing onnx or OpenVINO.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Dict, Tuple


class Format(ABC):
    name: ClassVar[str]
    runtimes: ClassVar[Tuple[str, ...]]  # the runtimes that read this format; the first is its own
    model_filename: ClassVar[str]  # the file a runtime opens (others, like IR's .bin, sit beside it)

    def model_file(self, folder: Path) -> Path:
        return Path(folder) / self.model_filename

    @property
    def native_runtime(self) -> str:
        return self.runtimes[0]

    @abstractmethod
    def from_onnx(self, onnx_file: Path, folder: Path) -> Path:
        """Write this format's files for the FP32 ONNX model into ``folder``; return the model file."""

    def describe(self, model_file: Path) -> Dict[str, Any]:
        """Facts about a written model worth keeping in its manifest (e.g. the ONNX opset)."""
        return {}


def _registry() -> Dict[str, Format]:
    from edgeopt.formats.onnx import OnnxFormat
    from edgeopt.formats.openvino import OpenVINOFormat

    return {f.name: f for f in (OnnxFormat(), OpenVINOFormat())}


FORMATS: Dict[str, Format] = _registry()


def get(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; expected one of {', '.join(FORMATS)}")
    return FORMATS[name]
