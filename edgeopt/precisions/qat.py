"""INT8 by quantization-aware training (QAT): for models whose post-training quantization costs too much
accuracy (depthwise and squeeze-excitation nets: MobileNetV3, EfficientNet), the FP32 model learns to
compute with INT8 rounding, taught by itself in FP32.

From the FP32 ONNX file the format was built from (the ONNX variant's own file; for OpenVINO IR, the
ONNX file kept beside the IR as ``source.onnx``):

1. its torch conversion (``edgeopt.models.brought.torch_from_onnx``: batch made dynamic, checked against
   the file at batch 1 and 16); a file that outputs probabilities is trained on its logits;
2. captured with ``torch.export`` and prepared by PT2E (torchao's ``prepare_qat_pt2e``) with
   :func:`layer_quantizer`: fake quantization at every convolution and linear layer's input and weights,
   in the numbers ONNX Runtime's CPU provider fuses into QLinearConv (U8S8: uint8 activations, asymmetric
   per tensor; int8 weights, symmetric per output channel; 7-bit weights where ``onnxruntime.reduce_range``
   resolves so) and OpenVINO runs in INT8. For ONNX each layer's output too, as ONNX Runtime fuses a layer
   only between Q/DQ pairs (its own PTQ places them so); for OpenVINO IR inputs only, where OpenVINO (and
   NNCF) places them: fewer roundings (on a net like tests/test_qat.py's, 200 steps: 97 % val on
   OpenVINO, 93 % with outputs quantized). The ranges start from the calibration images and follow the
   train batches (moving averages); they are frozen while the val split is evaluated;
3. fine-tuned by KD (``edgeopt.train.fit``: AdamW, warm-up and cosine decay, augmentation ``auto``) from
   the FP32 conversion itself, the weights best on the val split kept (the calibrated start where no step
   beat it);
4. converted (``convert_pt2e``) and exported (``torch.onnx.export``, dynamic batch) as ONNX QDQ, which
   the format writes as it writes any FP32 ONNX (OpenVINO IR: ``ov.convert_model``, the Q/DQ pairs
   becoming FakeQuantize).

Why PT2E and not NNCF's torch QAT: NNCF's fake quantizers compile a C++ extension at first use (about
3 minutes on a loaded 2-core machine, past NNCF's own 60 s timeout; a CUDA build needs nvcc), and NNCF
places its quantizers for OpenVINO (layer inputs only), which ONNX Runtime mostly cannot fuse. PT2E's
fake quantization is plain torch (CPU or CUDA), and its placement is ours to choose per runtime: on a
MobileNet-like test net every convolution ran INT8 on both (``edgeopt.runtimes.coverage``). PT2E is
torchao's (installed with the ``edge`` extra).

A step that cannot be done (a conversion onnx2torch refuses, a graph torch.export cannot capture, a file
in which the runtime runs no layer in INT8) fails this variant alone, with the reason.
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Tuple

from pydantic import Field

from edgeopt import formats
from edgeopt.config import FitConfig
from edgeopt.config.quant import OrtOptions, QATOptions, RecipeOptions
from edgeopt.formats.openvino import SOURCE
from edgeopt.precisions import ort
from edgeopt.precisions.base import Inputs, Precision

if TYPE_CHECKING:
    from torch import nn

EXAMPLE_BATCH = 2  # torch.export specializes a dynamic dimension that its example has at 1
EVALUATIONS = 4  # val evaluations of the fine-tune when ``eval_every`` is not set


class QATError(RuntimeError):
    """A step of the QAT recipe that cannot be done on this model (the message says which and why)."""


class Int8QatOptions(RecipeOptions):
    qat: QATOptions = Field(QATOptions(), description="The quantization-aware fine-tune.")
    onnxruntime: OrtOptions = Field(OrtOptions(), description="reduce_range: 7-bit weights (ONNX only).")


def weight_range(reduce_range: bool) -> Tuple[int, int]:
    """(quant_min, quant_max) of the symmetric int8 weights, as ONNX Runtime's quantizer sets them."""
    return (-64, 64) if reduce_range else (-127, 127)


def layer_quantizer(reduce_range: bool = False, outputs: bool = True):
    """A PT2E quantizer that fake-quantizes the input and the weights of every convolution and linear
    layer, and its output unless ``outputs`` is False (uint8 asymmetric activations per tensor, int8
    symmetric weights per output channel); the operations between layers stay in float, as the runtimes
    compute them."""
    import torch
    from torchao.quantization.pt2e import (
        FusedMovingAvgObsFakeQuantize,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
    )
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

    layers = {torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.linear.default}
    activation = QuantizationSpec(
        dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
        observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(observer=MovingAverageMinMaxObserver,
                                                                           eps=2**-12))
    low, high = weight_range(reduce_range)
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=low, quant_max=high, qscheme=torch.per_channel_symmetric, ch_axis=0,
        observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver, eps=2**-12))

    class LayerQuantizer(Quantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            for node in model.graph.nodes:
                if node.op == "call_function" and node.target in layers:
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={node.args[0]: activation, node.args[1]: weight},
                        output_qspec=activation if outputs else None, _annotated=True)
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            pass

    return LayerQuantizer()


def _prepared(model: "nn.Module", input_shape, quantizer) -> "nn.Module":
    """The torch model captured by torch.export (dynamic batch) with its fake quantizers inserted."""
    import torch
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from edgeopt.models.brought import first_line
    from edgeopt.models.converted import traceable

    example = torch.zeros(EXAMPLE_BATCH, *input_shape)
    try:
        with traceable(model):
            program = torch.export.export(model.eval(), (example,),
                                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    except Exception as err:  # noqa: BLE001 - what torch.export says is the reason
        raise QATError(f"torch.export cannot capture the model's torch conversion ({first_line(err)})") from None
    try:
        prepared = prepare_qat_pt2e(program.module(), quantizer)
    except Exception as err:  # noqa: BLE001
        raise QATError(f"PT2E cannot insert fake quantization ({first_line(err)})") from None
    allow_exported_model_train_eval(prepared)  # train()/eval() switch nothing else in an exported graph
    return prepared


def _observing(prepared: "nn.Module") -> "nn.Module":
    """``prepared`` whose range observers follow the batches in train mode and are frozen in eval mode,
    so that evaluating the val split does not move the quantization ranges."""
    from torch import nn
    from torchao.quantization.pt2e import disable_observer, enable_observer

    class Observing(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

        def train(self, mode: bool = True):
            super().train(mode)
            self.inner.apply(enable_observer if mode else disable_observer)
            return self

    return Observing(prepared)


def _calibrate(student: "nn.Module", images, batch_size: int) -> None:
    """The quantization ranges' starting points: the calibration images through the observers."""
    import torch

    student.train()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            student(torch.from_numpy(images[i:i + batch_size]))


def _drop_metadata(path: Path) -> None:
    """Remove the exporter's per-node metadata (source stack traces): on a small model they outweigh the
    INT8 weights (a 9 kB model: 171 kB with them, 51 kB without)."""
    import onnx

    m = onnx.load(str(path))
    for node in m.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(m, str(path))


def output_of(src: Path, inputs: Inputs) -> str:
    """'logits' or 'probabilities': what the FP32 file outputs, read from its outputs on val images."""
    from edgeopt.models.brought import output_kind
    from edgeopt.runtimes import make_predictor

    return output_kind(make_predictor("onnxruntime", src).predict_batched(next(inputs.dataset.batches("val", 16))[0]))


def fine_tune_config(o: QATOptions) -> FitConfig:
    return FitConfig(steps=o.steps, batch_size=o.batch_size, lr=o.lr, weight_decay=o.weight_decay, optimizer="adamw",
                     eval_every=o.eval_every or max(1, o.steps // EVALUATIONS), bn_recalibration_batches=0,
                     device=o.device)


def quantize(src: Path, dst: Path, fmt: str, o: QATOptions, quantizer, inputs: Inputs) -> Dict[str, Any]:
    """The ``fmt`` file at ``dst`` (its format's model file) of the FP32 ONNX model at ``src``, trained with
    the fake quantization that ``quantizer`` (:func:`layer_quantizer`) places. Returns what happened: the val
    accuracy in torch at the start (fake quantization calibrated, as PTQ would leave it) and after the
    fine-tune, the steps, and how many layers the format's runtime executes in INT8."""
    import torch
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from edgeopt.models.brought import PretrainedError, torch_from_onnx
    from edgeopt.models.export import export_onnx
    from edgeopt.runtimes.coverage import int8_coverage
    from edgeopt.train.fit import fit, split_accuracy

    dataset, shape = inputs.dataset, inputs.dataset.input_shape
    output = output_of(src, inputs)
    try:
        model = torch_from_onnx(src, dataset, output).model
    except PretrainedError as err:
        raise QATError(f"no torch model to train: {err}") from None
    teacher = copy.deepcopy(model).eval()
    prepared = _prepared(model, shape, quantizer)
    student = _observing(prepared)
    _calibrate(student, inputs.calibration, o.batch_size)
    start, calibrated = split_accuracy(student, dataset, "val", o.batch_size), copy.deepcopy(student.state_dict())
    history = fit(student, dataset, fine_tune_config(o), teacher=teacher, kd=o.kd, seed=inputs.seed, desc="qat")
    if history["best_val_acc"] < start:  # the fine-tune made it worse on val: keep the calibrated start
        student.load_state_dict(calibrated)
    quantized = convert_pt2e(prepared)
    allow_exported_model_train_eval(quantized)
    deployed = quantized if output == "logits" else torch.nn.Sequential(quantized, torch.nn.Softmax(1))
    f = formats.get(fmt)
    with tempfile.TemporaryDirectory() as tmp:
        qdq = Path(tmp) / "qdq.onnx"
        try:
            export_onnx(deployed, shape, qdq)
        except Exception as err:  # noqa: BLE001 - what the exporter says is the reason
            raise QATError(f"the quantized model does not export to ONNX ({str(err).splitlines()[0]})") from None
        _drop_metadata(qdq)
        written = f.from_onnx(qdq, dst.parent)
    coverage = int8_coverage(f.native_runtime, written)
    if not coverage["int8_ops"]:
        raise QATError(f"{f.native_runtime} runs no layer of the QAT model in INT8 ({coverage['float_ops']} in float)")
    return {"qat": {
        "val_accuracy_calibrated": start, "val_accuracy": max(start, history["best_val_acc"]),
        "best_step": history["best_step"] if history["best_val_acc"] >= start else 0,
        "steps": history["steps"], "device": history["device"], "runtime": f.native_runtime,
        "int8_layers": coverage["int8_ops"], "float_layers": coverage["float_ops"],
    }}


# ---------------------------------------------------------------- per format


def _itself(src: Path) -> Path:
    return src


def _beside(src: Path) -> Path:
    path = Path(src).parent / SOURCE
    if not path.is_file():
        raise QATError(f"{Path(src).name}: no FP32 ONNX file beside it ({SOURCE}): QAT trains the model's torch "
                       f"conversion, which only an ONNX file gives")
    return path


@dataclass(frozen=True)
class _Route:
    source: Callable[[Path], Path]  # the format's model file -> the FP32 ONNX file it was built from
    reduce_range: Callable[[OrtOptions], bool]  # 7-bit weights (ONNX Runtime's U8S8 on x86 without VNNI)
    outputs: bool  # layer outputs quantized too (ONNX Runtime fuses a layer only between Q/DQ pairs)
    resolved: Tuple[str, ...] = ()  # the ``onnxruntime`` options it resolves on this CPU


# OpenVINO quantizes layer inputs only (NNCF's placement): fewer roundings than ONNX Runtime's
ROUTES: Dict[str, _Route] = {"onnx": _Route(_itself, ort.reduce_range, True, ("reduce_range",)),
                             "openvino": _Route(_beside, lambda o: False, False)}


def _apply(fmt: str):
    route = ROUTES[fmt]

    def apply(src: Path, dst: Path, options: Int8QatOptions, inputs: Inputs) -> Dict[str, Any]:
        if importlib.util.find_spec("torchao") is None:
            raise QATError("PT2E QAT needs torchao (the edge extra: pip install 'edgeopt[edge]', or pip install torchao)")
        quantizer = layer_quantizer(route.reduce_range(options.onnxruntime), route.outputs)
        return quantize(route.source(src), dst, fmt, options.qat, quantizer, inputs)
    return apply


class Int8Qat(Precision):
    name = "int8-qat"
    Options = Int8QatOptions
    implementations = {fmt: _apply(fmt) for fmt in ROUTES}

    def recipe(self, fmt: str, options: Int8QatOptions, n_calibration: int) -> Tuple[Dict[str, Any], str]:
        o = options.qat
        route = ROUTES[fmt]
        rr = route.reduce_range(options.onnxruntime)
        cfg = fine_tune_config(o)
        low, high = weight_range(rr)
        used = {"calibration_samples": n_calibration,
                "quantized": f"conv/linear input, weights{', output' if route.outputs else ''}",
                "activations": "uint8 asymmetric per-tensor", "weights": f"int8 symmetric per-channel [{low}, {high}]",
                "reduce_range": rr, "teacher": "fp32 (its torch conversion)", "optimizer": cfg.optimizer,
                "steps": o.steps, "batch_size": o.batch_size, "lr": o.lr, "weight_decay": o.weight_decay,
                "warmup": cfg.warmup, "eval_every": cfg.eval_every, "augment": cfg.augment,
                "kd_temperature": o.kd.temperature, "kd_alpha": o.kd.alpha, "device": o.device,
                **ort._resolved_on(options.onnxruntime, route.resolved)}
        return used, (f"PT2E QAT U8S8 per-channel{' reduce-range' if rr else ''}, {o.steps} steps of KD from FP32 "
                      f"(T={o.kd.temperature:g}, alpha={o.kd.alpha:g}), AdamW lr {o.lr:g}, exported as ONNX QDQ")
