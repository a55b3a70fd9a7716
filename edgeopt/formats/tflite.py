"""LiteRT (TensorFlow Lite): one ``model.tflite`` flatbuffer; read by the LiteRT runtime.

Built from the torch module (``source = "torch"``) by litert-torch, which cannot share edgeopt's
environment (its xdsl pins ``typing-extensions<4.13``; edgeopt's pydantic needs 4.14 or later). It runs
in the converter environment ``scripts/setup.sh`` makes, ``.venv/litert`` (litert-torch and
ai-edge-quantizer; edgeopt's own torch, numpy and ai-edge-litert reused through a ``.pth`` file, so the
torch that saves the program is the torch that loads it), as a subprocess with files in and out:
``litert_convert.py`` (standalone). ``EDGEOPT_LITERT_PYTHON`` names another interpreter for it.

``tflite`` takes NCHW input like the torch model (litert-torch puts a TRANSPOSE in front);
``tflite-nhwc`` takes NHWC input, what Android apps feed. The LiteRT predictor feeds either from
edgeopt's NCHW batches. The INT8 and FP16 recipes quantize the FP32 ``.tflite`` itself (:func:`quantize`).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Sequence

from edgeopt.formats.base import Format
from edgeopt.formats.litert_convert import ERROR, UNSUPPORTED
from edgeopt.formats.torch_source import SOURCE, UnsupportedOperator, save_program

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

PYTHON_ENV = "EDGEOPT_LITERT_PYTHON"
CONVERTER = Path(__file__).with_name("litert_convert.py")
DEFAULT_PYTHON = Path(__file__).resolve().parents[2] / ".venv" / "litert" / "bin" / "python"  # scripts/setup.sh's
TIMEOUT_S = 3600


def converter_python() -> Path:
    py = Path(os.environ.get(PYTHON_ENV) or DEFAULT_PYTHON)
    if not py.is_file():
        raise RuntimeError(f"the LiteRT converter environment is missing ({py}): run scripts/setup.sh, or set "
                           f"{PYTHON_ENV} to a Python with litert-torch 0.10.0 and this torch")
    return py


def run_converter(*args: Any) -> None:
    """``litert_convert.py <args>`` in the converter environment; its error line raised as the failure."""
    with tempfile.TemporaryDirectory() as cwd:  # -I: neither this folder nor the caller's is on its sys.path
        done = subprocess.run([str(converter_python()), "-I", str(CONVERTER), *map(str, args)], cwd=cwd,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        said = [ln.removeprefix(ERROR) for ln in lines if ln.startswith(ERROR)]
        why = said[-1] if said else f"exit {done.returncode}: {lines[-1] if lines else 'no output'}"
        raise (UnsupportedOperator if why.startswith(UNSUPPORTED) else RuntimeError)(why)


def quantize(src: Path, dst: Path, scheme: str, calibration: "np.ndarray | None" = None, int8_io: bool = False) -> None:
    """The ``int8`` (static, calibrated on ``calibration``, N x C x H x W float32; float32 input and output
    unless ``int8_io``) or ``fp16`` version of the FP32 ``.tflite`` ``src``, written to ``dst``
    (ai-edge-quantizer, in the converter environment)."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        extra: list = []
        if calibration is not None:
            np.save(Path(tmp) / "calibration.npy", np.ascontiguousarray(calibration, np.float32))
            extra = ["--calibration", Path(tmp) / "calibration.npy"]
        run_converter("quantize", src, dst, "--scheme", scheme, *extra, *(["--int8-io"] if int8_io else []))


class TFLiteFormat(Format):
    name = "tflite"
    source = "torch"
    runtimes = ("litert",)
    model_filename = "model.tflite"
    nhwc: ClassVar[bool] = False

    def from_torch(self, model: "nn.Module", input_shape: Sequence[int], folder: Path) -> Path:
        with tempfile.TemporaryDirectory() as tmp:
            save_program(model, input_shape, Path(tmp) / SOURCE)
            run_converter("convert", Path(tmp) / SOURCE, self.model_file(folder), *(["--nhwc"] if self.nhwc else []))
        return self.model_file(folder)

    def describe(self, model_file: Path) -> Dict[str, Any]:
        return {"layout": "NHWC" if self.nhwc else "NCHW"}


class TFLiteNHWCFormat(TFLiteFormat):
    name = "tflite-nhwc"
    nhwc = True
