"""ExecuTorch's INT8 and FP16, rebuilt from the torch program kept beside the FP32 ``.pte``.

A lowered ``.pte`` cannot be quantized again, so the ExecuTorch format keeps the program it was
lowered from (``source.pt2``, :mod:`edgeopt.formats.torch_source`) and these recipes start from it:

- INT8: PT2E static post-training quantization with ExecuTorch's ``XNNPACKQuantizer``: INT8 weights,
  symmetric per output channel, INT8 activations (asymmetric, per tensor: XNNPACK's QS8 kernels),
  calibrated on the recipe's images one at a time (the program's batch is 1); ``convert_pt2e``, then
  the same lowering as the FP32 file (:func:`edgeopt.formats.pte.lower`);
- FP16: the program's weights and arithmetic in half, with float32 input and output (a cast at each
  end, as the ONNX recipe keeps float32 I/O): XNNPACK computes it in FP16 (natively on ARM and on x86
  CPUs with AVX512-FP16, converted elsewhere). XNNPACK keeps FP32 filters in the file and converts
  them when it loads, so the file is hardly smaller: FP16 here is for the arithmetic, not the size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

from edgeopt.formats import get
from edgeopt.formats.pte import lower
from edgeopt.formats.torch_source import SOURCE, load_program
from edgeopt.precisions.base import Inputs

FORMAT = "executorch"
INT8_METHOD = "ExecuTorch PT2E static INT8 (XNNPACKQuantizer, per-channel weights), lowered to XNNPACK"
FP16_RECIPE: Tuple[Dict[str, Any], str] = ({"weights": "fp16", "compute": "fp16", "io": "fp32"},
                                           "ExecuTorch FP16 program (XNNPACK FP16 kernels, float32 I/O)")


def int8_recipe(n_calibration: int) -> Tuple[Dict[str, Any], str]:
    return ({"quantizer": "XNNPACKQuantizer (PT2E)", "weights": "int8 symmetric per-channel",
             "activations": "int8 asymmetric per-tensor", "calibration_samples": n_calibration}, INT8_METHOD)


def source_of(src: Path) -> Path:
    path = Path(src).parent / SOURCE
    if not path.is_file():
        raise RuntimeError(f"{src.name}: no torch program beside it ({SOURCE}): ExecuTorch recipes rebuild from it")
    return path


def quantize_int8(src: Path, dst: Path, options: Any, inputs: Inputs) -> Dict[str, Any]:
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    module, example = load_program(source_of(src))
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(module, (example,)).module(), quantizer)
    with torch.no_grad():
        for image in inputs.calibration:
            prepared(torch.from_numpy(image[None]))
        quantized = convert_pt2e(prepared)
        lower(torch.export.export(quantized, (example,)), dst)
    return get(FORMAT).describe(dst)


def convert_fp16(src: Path, dst: Path, options: Any, inputs: Inputs) -> Dict[str, Any]:
    import torch

    module, example = load_program(source_of(src))

    class Half(torch.nn.Module):
        def __init__(self, m: torch.nn.Module):
            super().__init__()
            self.m = m.half()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(x.half()).float()

    with torch.no_grad():
        lower(torch.export.export(Half(module), (example,)), dst)
    return get(FORMAT).describe(dst)
