"""The LiteRT converter, run by ``edgeopt.formats.tflite`` in the converter environment, never in edgeopt's:

    python -I litert_convert.py convert  SOURCE.pt2 OUT.tflite [--nhwc]
    python -I litert_convert.py quantize IN.tflite OUT.tflite --scheme int8 --calibration CALIBRATION.npy [--int8-io]
    python -I litert_convert.py quantize IN.tflite OUT.tflite --scheme fp16

Standalone on purpose: it imports torch, numpy, litert_torch and ai_edge_quantizer and nothing of
edgeopt, whose pydantic needs a typing-extensions that litert-torch's xdsl refuses (``-I`` keeps this
file's folder off ``sys.path`` as well). Files in, files out:

- ``convert``: the torch program (``torch.export.save``, batch 1) to an FP32 ``.tflite`` with
  litert-torch; ``--nhwc`` gives it NHWC input (named ``images_nhwc``: the runtime reads the layout
  from the name), what Android apps feed;
- ``quantize``: ai-edge-quantizer on the FP32 ``.tflite``: ``int8`` is its ``static_wi8_ai8`` recipe
  (INT8 weights, symmetric per channel; INT8 activations, calibrated on the images of the ``.npy``,
  N x C x H x W float32 as every recipe gets them, each tensor's range the widest over them: on a digits
  CNN its default moving average clipped the top logits by up to 3.7 where the widest range is off by
  0.23, at the same accuracy). Its input and output stay float32, quantized and dequantized by
  QUANTIZE / DEQUANTIZE ops inside the model; ``--int8-io`` leaves them int8, as the recipe does by
  default (an app that feeds quantized frames), and the caller quantizes with their scale and zero point.
  ``fp16`` is its float-casting of the weights to FP16.

A failure is one line on stderr starting with ``litert-convert: error:`` and exit status 1; an
operator the converter cannot lower is named (``LiteRT cannot take operator aten.x.default: ...``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ERROR = "litert-convert: error: "
UNSUPPORTED = "LiteRT cannot take operator "
OPERATOR = re.compile(r"\b(aten(?:\.|::)[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)")


def convert(source: Path, out: Path, nhwc: bool) -> None:
    import litert_torch
    import torch

    program = torch.export.load(str(source))
    module = program.module()
    (x,), _ = program.example_inputs
    if nhwc:
        class ChannelsLast(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, images_nhwc):
                return self.m(images_nhwc.permute(0, 3, 1, 2))

        edge = litert_torch.convert(ChannelsLast(module), sample_kwargs={"images_nhwc": x.permute(0, 2, 3, 1)})
    else:
        edge = litert_torch.convert(module, (x,))
    edge.export(str(out))


def widest_range(qsv: dict, new: dict) -> dict:
    """Each tensor's range over every calibration image (ai-edge-quantizer's default is a moving average
    of each image's range, which clips the largest activations and logits)."""
    import numpy as np

    return {"min": np.minimum(qsv["min"], new["min"]), "max": np.maximum(qsv["max"], new["max"])} if qsv else new


def quantize(src: Path, out: Path, scheme: str, calibration: Path | None, int8_io: bool = False) -> None:
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import calibrator, quantizer, recipe, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.qtyping import TFLOperationName

    if scheme == "int8":
        manager = recipe_manager.RecipeManager()
        manager.load_quantization_recipe(recipe.static_wi8_ai8())
        if not int8_io:  # float32 in and out: QUANTIZE / DEQUANTIZE ops at the edges, run by the runtime
            for edge in (TFLOperationName.INPUT, TFLOperationName.OUTPUT):
                manager.add_quantization_config(regex=".*", operation_name=edge, algorithm_key=AlgorithmName.NO_QUANTIZE)
        (key, sig), = Interpreter(model_path=str(src)).get_signature_list().items()
        (name,) = sig["inputs"]
        images = np.load(str(calibration)).astype(np.float32)
        if name.lower().endswith("nhwc"):
            images = images.transpose(0, 2, 3, 1)
        cal = calibrator.Calibrator(str(src), num_threads=1, qsv_update_func=widest_range)
        cal.calibrate({key: [{name: x[None]} for x in images]}, manager)
        qt = quantizer.Quantizer(str(src), manager.get_quantization_recipe())
        qt.quantize(cal.get_model_qsvs()).export_model(str(out), overwrite=True)
    else:  # fp16: FP16 weights, dequantized to float where they are used
        qt = quantizer.Quantizer(str(src))
        qt.add_weight_only_config(regex=".*", operation_name=TFLOperationName.ALL_SUPPORTED, num_bits=16,
                                  algorithm_key=AlgorithmName.FLOAT_CASTING)
        qt.quantize().export_model(str(out), overwrite=True)


def message(err: BaseException) -> str:
    text = "\n".join(ln.strip() for ln in str(err).splitlines() if ln.strip()) or type(err).__name__
    first = text.splitlines()[0]
    op = OPERATOR.search(first) if "Lowering not found" in first else None
    return f"{UNSUPPORTED}{op.group(1)}: {first}" if op else f"{type(err).__name__}: {first}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="litert-convert")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert")
    c.add_argument("source", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--nhwc", action="store_true")
    q = sub.add_parser("quantize")
    q.add_argument("src", type=Path)
    q.add_argument("out", type=Path)
    q.add_argument("--scheme", choices=("int8", "fp16"), required=True)
    q.add_argument("--calibration", type=Path)
    q.add_argument("--int8-io", action="store_true")
    a = p.parse_args(argv)
    try:
        if a.command == "convert":
            convert(a.source, a.out, a.nhwc)
        else:
            quantize(a.src, a.out, a.scheme, a.calibration, a.int8_io)
    except Exception as err:  # noqa: BLE001 - the caller gets one line
        print(ERROR + message(err)[:500], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
