"""Formats: what an exported model is on disk, what it is built from, and which runtimes read it.

A format is one module with a :class:`~edgeopt.formats.base.Format` subclass: its file names, its
``source`` (an FP32 ONNX file, or the torch module), how to write it from that source, what to record
about a file, and the runtimes that can run it. ``edgeopt.models.export`` builds every variant's FP32
file from the source its format declares. Which precisions apply to a format is said by the precision
recipes (``edgeopt.precisions``), each of which names the formats it has an implementation for. A new
format is one module here plus one entry in ``_registry``: no ``format == "onnx"`` test lives anywhere else.

The modules import their heavy libraries inside their methods, so the config can list formats
without importing onnx, OpenVINO, torch, ExecuTorch or LiteRT.
"""

from __future__ import annotations

from typing import Dict

from edgeopt.formats.base import Format


def _registry() -> Dict[str, Format]:
    from edgeopt.formats.onnx import OnnxFormat
    from edgeopt.formats.openvino import OpenVINOFormat
    from edgeopt.formats.pte import ExecuTorchFormat
    from edgeopt.formats.tflite import TFLiteFormat, TFLiteNHWCFormat

    return {f.name: f for f in (OnnxFormat(), OpenVINOFormat(), TFLiteFormat(), TFLiteNHWCFormat(), ExecuTorchFormat())}


FORMATS: Dict[str, Format] = _registry()


def get(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; expected one of {', '.join(FORMATS)}")
    return FORMATS[name]
