"""``variants.quant``: the options of every precision recipe, grouped by the tool that applies them.

Plain data: each recipe (``edgeopt.precisions``) reads the groups it uses from here.
"""

from __future__ import annotations

from typing import List, Literal, Optional

from pydantic import Field

from edgeopt.config.base import Strict
from edgeopt.config.training import KDConfig


class RecipeOptions(Strict):
    """Base of every recipe's options: unknown fields are errors, values are frozen."""


class OrtOptions(RecipeOptions):
    """``variants.quant.onnxruntime``: ONNX Runtime quantization (int8 on ONNX, int8-dynamic)."""

    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="How activation ranges are taken from the calibration images (int8).")
    per_channel: bool = Field(True, description="Per-channel weight scales.")
    activation_type: Literal["auto", "uint8", "int8"] = Field(
        "auto", description="uint8 = U8S8, int8 = S8S8; auto: uint8 on x86 (the only type ONNX Runtime fuses "
                            "into QLinearConv there), int8 on ARM (both fuse; symmetric is ORT's advice).")
    reduce_range: Literal["auto", True, False] = Field(
        "auto", description="7-bit weights; auto: on x86 without VNNI/AMX, where U8S8 products can saturate.")
    dynamic_op_types: List[Literal["MatMul", "Conv", "Attention", "LSTM"]] = Field(
        ["MatMul"], min_length=1,
        description="Operators int8-dynamic quantizes. Conv is left out by default: ONNX Runtime runs it as "
                    "ConvInteger, 7x slower than the FP32 Conv on ResNet-18.")


class NNCFOptions(RecipeOptions):
    """``variants.quant.nncf``: NNCF post-training quantization (int8 on OpenVINO IR, int8-acc)."""

    preset: Literal["performance", "mixed"] = Field(
        "mixed", description="performance: symmetric activations; mixed: asymmetric activations (better on "
                             "h-swish/SiLU; on an AMD EPYC with AVX512-VNNI 15-17 % slower on EfficientNet-Lite1, a ReLU6 net "
                             "that gains nothing from it: set performance there).")
    target_device: Literal["any", "cpu", "cpu_spr", "gpu", "npu"] = Field(
        "cpu", description="NNCF hardware config: which operations get quantized and how.")
    subset_size: int = Field(300, ge=1, le=100000, description="Calibration samples NNCF uses (<= calibration_samples).")
    bias_correction: Literal["full", "fast", "none"] = Field(
        "full", description="full: NNCF's BiasCorrection (a third of FastBiasCorrection's output error on "
                            "EfficientNet-Lite0, 1.3-3x its quantization time); fast: FastBiasCorrection; none.")
    model_type: Literal["auto", "cnn", "transformer"] = Field(
        "auto", description="transformer: NNCF's transformer patterns and SmoothQuant; auto: transformer when the "
                            "graph has an activation x activation MatMul (attention).")
    ignore_first: Literal["auto", True, False] = Field(
        "auto", description="Keep the first weighted layer (it sees the raw image) in floating point; auto: int8 on "
                            "OpenVINO IR builds both, measures them on this CPU and keeps the layer in float only "
                            "where every-layer INT8 breaks auto_max_drop; NNCF without val data (int8-acc: its "
                            "accuracy control reverts what costs accuracy) quantizes it.")
    ignore_last: Literal["auto", True, False] = Field(
        False, description="Keep the last weighted layer (the classifier) in floating point; auto as ignore_first "
                           "(off by default: it changed no accuracy measured so far and doubles what auto builds).")
    auto_max_drop: float = Field(
        0.5, ge=0, le=100, description="auto: the largest top-1 drop vs FP32 on the val split (points) that the "
                                       "fastest candidate may cost; where every candidate costs more, the most "
                                       "accurate is kept.")
    auto_max_images: int = Field(
        500, ge=1, le=10_000_000, description="auto: the most val images FP32 and each candidate are scored on (a "
                                             "seeded sample of the split, the same for all; the whole split where "
                                             "it is smaller), so that a large val split does not cost one full "
                                             "pass per candidate; the choice records how many were scored.")


class AccuracyControlOptions(RecipeOptions):
    """``variants.quant.accuracy_control``: int8-acc's bound and budget."""

    max_drop: float = Field(1.0, gt=0, le=100, description="Largest top-1 drop vs FP32 on the val split (points).")
    max_iterations: int = Field(20, ge=1, le=1000, description="Most groups of layers reverted to floating point.")


class QATOptions(RecipeOptions):
    """``variants.quant.qat``: int8-qat's quantization-aware fine-tune of the FP32 model's torch conversion,
    distilled from the FP32 model itself (steps with a warm-up and a cosine decay, AdamW)."""

    steps: int = Field(100, ge=1, le=1_000_000, description="Optimizer steps of the fine-tune (digits: seconds).")
    batch_size: int = Field(64, ge=2, le=4096, description="Train images per step.")
    lr: float = Field(1e-3, gt=0, le=1, description="Peak learning rate (AdamW), reached after a warm-up of a tenth "
                                                    "of the steps (on a net like tests/test_qat.py's, 100 steps: at "
                                                    "1e-4 the ONNX file stayed 1 point below PTQ, at 1e-3 it ended "
                                                    "14 above).")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW's decoupled weight decay.")
    eval_every: Optional[int] = Field(
        None, ge=1, description="Evaluate on the val split every this many steps (the weights best there are kept); "
                                "default: four evaluations, the last at the end.")
    kd: KDConfig = Field(KDConfig(), description="The distillation loss (the FP32 model is the teacher).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the fine-tune runs: auto (CUDA when torch sees a GPU, else the CPU), cpu or cuda.")


class QuantConfig(Strict):
    """``variants.quant``: the options of every precision recipe, grouped by the tool that applies them;
    each recipe reads the groups it uses (edgeopt.precisions)."""

    calibration_samples: int = Field(
        200, ge=1, le=100000, description="Calibration images drawn from the train split."
    )
    onnxruntime: OrtOptions = OrtOptions()
    nncf: NNCFOptions = NNCFOptions()
    accuracy_control: AccuracyControlOptions = AccuracyControlOptions()
    qat: QATOptions = QATOptions()
