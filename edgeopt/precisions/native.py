"""The CPU's native float precisions, on OpenVINO: bf16, fp16-native, and INT8 with bf16 between.

On a CPU with AVX512_BF16 or AMX-BF16, OpenVINO computes convolutions and matmuls in bf16 (8 bits of
mantissa, FP32's range): no calibration, close to FP32 accuracy, often about 2x faster than f32 (an
AMX Xeon ran a fine-tuned EfficientNet-Lite2 2.34x faster at equal accuracy). A CPU with AVX512_FP16
or AMX-FP16 computes natively in IEEE half (10 bits of mantissa, a narrower range): ``fp16-native``,
which is not ``fp16`` (FP16 weight compression, computed in f32). ``int8-bf16`` is the int8 recipe's
NNCF IR with the layers it leaves in float (the first by default, and the ops between quantized
ones) computed in bf16.

bf16 and fp16-native write an IR with FP16 weights (OpenVINO's weight compression: half the file; the
CPU computes in bf16 or f16 anyway, so the weights lose nothing the computation keeps: bf16 has fewer
mantissa bits than FP16), int8-bf16 one with the int8 recipe's INT8 weights; each carries the
precision it is to be compiled with in its rt_info (``runtime_options/INFERENCE_PRECISION_HINT``):
edgeopt's OpenVINO predictor compiles it with that hint wherever it runs (evaluate, the edge agent, the
server) and records the precision OpenVINO really used. ``validate`` refuses each on a CPU without
one of its ``cpu_flags`` (where OpenVINO would quietly compute in another precision).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Dict, Tuple

from edgeopt.precisions import int8
from edgeopt.precisions.base import Apply, Inputs, Precision

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
FP16_FLAGS = ("avx512_fp16", "amx_fp16")


def hinted(precision: str, build: Apply | None = None, fp16_weights: bool = False) -> Apply:
    """An OpenVINO implementation that writes the IR with ``precision`` (bf16, f16) as its inference
    hint: the IR ``build`` makes of the source (in a temporary folder), or without ``build`` the source;
    its float weights in FP16 where ``fp16_weights``."""

    def apply(src: Path, dst: Path, options: Any, inputs: Inputs) -> Dict[str, Any]:
        from edgeopt.runtimes.openvino import save_with_precision

        with tempfile.TemporaryDirectory() as tmp:
            facts: Dict[str, Any] = {}
            if build is not None:
                built = Path(tmp) / src.name
                facts = build(src, built, options, inputs)
                src = built
            save_with_precision(src, dst, precision, fp16_weights)
        return facts

    return apply


class _FloatOnCPU(Precision):
    """FP16 weights, computed in ``hint`` (no name: a base, not a recipe)."""

    hint: ClassVar[str]

    def recipe(self, fmt: str, options: Any, n_calibration: int) -> Tuple[Dict[str, Any], str]:
        return ({"weights": "fp16", "inference_precision": self.hint},
                f"OpenVINO {self.hint} inference, FP16 weights (a CPU with {' or '.join(self.cpu_flags)})")


class BF16(_FloatOnCPU):
    name = "bf16"
    hint = "bf16"
    cpu_flags = BF16_FLAGS
    implementations = {"openvino": hinted("bf16", fp16_weights=True)}


class FP16Native(_FloatOnCPU):
    name = "fp16-native"
    hint = "f16"
    cpu_flags = FP16_FLAGS
    implementations = {"openvino": hinted("f16", fp16_weights=True)}


class Int8BF16(int8.Int8):
    """The int8 recipe's OpenVINO IR (its options, ``variants.quant.nncf``), its float layers in bf16."""

    name = "int8-bf16"
    cpu_flags = BF16_FLAGS
    implementations = {"openvino": hinted("bf16", functools.partial(int8.quantize_openvino, precision="bf16"))}

    def recipe(self, fmt: str, options: int8.Int8Options, n_calibration: int) -> Tuple[Dict[str, Any], str]:
        used, method = super().recipe(fmt, options, n_calibration)
        return {**used, "inference_precision": "bf16"}, f"{method}, float layers in bf16"
