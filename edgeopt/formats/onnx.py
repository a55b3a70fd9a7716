"""ONNX: one ``model.onnx`` file with its weights embedded; read by ONNX Runtime and OpenVINO."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict

from edgeopt.formats.base import Format


def opset(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


class OnnxFormat(Format):
    name = "onnx"
    runtimes = ("onnxruntime", "openvino")
    model_filename = "model.onnx"

    def from_onnx(self, onnx_file: Path, folder: Path) -> Path:
        return Path(shutil.copy2(onnx_file, self.model_file(folder)))

    def describe(self, model_file: Path) -> Dict[str, Any]:
        return {"opset": opset(model_file)}
