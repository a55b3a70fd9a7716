"""OpenVINO IR: ``model.xml`` (the graph) + ``model.bin`` (the weights); read by OpenVINO. The FP32 ONNX
file it was converted from is kept beside it as ``source.onnx``: an IR converts to no trainable model, and
a recipe that trains (int8-qat) starts from that file."""

from __future__ import annotations

import shutil
from pathlib import Path

from edgeopt.formats.base import Format

SOURCE = "source.onnx"


class OpenVINOFormat(Format):
    name = "openvino"
    runtimes = ("openvino",)
    model_filename = "model.xml"

    def from_onnx(self, onnx_file: Path, folder: Path) -> Path:
        """Convert with FP32 weights (FP16 is a precision recipe of its own)."""
        import openvino as ov

        xml = self.model_file(folder)
        ov.save_model(ov.convert_model(str(onnx_file)), str(xml), compress_to_fp16=False)
        shutil.copy2(onnx_file, Path(folder) / SOURCE)
        return xml
