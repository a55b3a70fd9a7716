"""OpenVINO IR: ``model.xml`` (the graph) + ``model.bin`` (the weights); read by OpenVINO."""

from __future__ import annotations

from pathlib import Path

from edgeopt.formats.base import Format


class OpenVINOFormat(Format):
    name = "openvino"
    runtimes = ("openvino",)
    model_filename = "model.xml"

    def from_onnx(self, onnx_file: Path, folder: Path) -> Path:
        """Convert with FP32 weights (FP16 is a precision recipe of its own)."""
        import openvino as ov

        xml = self.model_file(folder)
        ov.save_model(ov.convert_model(str(onnx_file)), str(xml), compress_to_fp16=False)
        return xml
