"""Accuracy-controlled INT8: NNCF post-training quantization, then the groups of layers that cost
most top-1 on the val split are reverted to floating point, one at a time, until the drop is within
``accuracy_control.max_drop`` points.

OpenVINO IR: NNCF's OpenVINO backend, validated on OpenVINO in f32, its IR written as is. ONNX:
NNCF's ONNX backend, validated on ONNX Runtime, picks the layers that stay in float; ONNX Runtime's
static QDQ (``onnxruntime`` options) writes the file without them, so that what stays INT8 is what
ONNX Runtime's CPU provider fuses (``nncf_backend._onnx_write``). The manifest records the layers
reverted, how many the runtime executes in INT8, and the val accuracy before and after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

from pydantic import Field

from edgeopt.config.quant import AccuracyControlOptions, NNCFOptions, OrtOptions, RecipeOptions
from edgeopt.precisions import nncf_backend, ort
from edgeopt.precisions.base import Inputs, Precision


class Int8AccOptions(RecipeOptions):
    nncf: NNCFOptions = Field(NNCFOptions(), description="NNCF post-training quantization.")
    accuracy_control: AccuracyControlOptions = Field(AccuracyControlOptions(), description="The bound and budget.")
    onnxruntime: OrtOptions = Field(OrtOptions(), description="How the ONNX file is written (ONNX only).")


def _apply(fmt: str):
    def apply(src: Path, dst: Path, options: Int8AccOptions, inputs: Inputs) -> Dict[str, Any]:
        return nncf_backend.quantize_with_accuracy_control(src, dst, fmt, inputs, options.nncf,
                                                           options.accuracy_control, options.onnxruntime)
    return apply


class Int8Acc(Precision):
    name = "int8-acc"
    Options = Int8AccOptions
    implementations = {fmt: _apply(fmt) for fmt in nncf_backend.BACKENDS}

    def recipe(self, fmt: str, options: Int8AccOptions, n_calibration: int) -> Tuple[Dict[str, Any], str]:
        acc = options.accuracy_control
        ort_used, ort_method = ort.static_recipe(options.onnxruntime, n_calibration)
        writer = {"onnx": (ort_used, f", written by {ort_method}"), "openvino": ({}, "")}[fmt]
        used = {**writer[0], **nncf_backend.recipe(options.nncf, n_calibration), "max_drop": acc.max_drop,
                "drop_type": "absolute", "max_iterations": acc.max_iterations, "metric": "top-1 val"}
        return used, (f"NNCF accuracy-controlled PTQ ({nncf_backend.BACKENDS[fmt].runtime} validation) "
                      f"max_drop={acc.max_drop:g} points, {nncf_backend.method(options.nncf)}{writer[1]}")
