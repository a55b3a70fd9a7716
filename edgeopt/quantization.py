"""INT8 post-training quantization: ONNX Runtime static QDQ for ONNX, NNCF for OpenVINO IR.

Both calibrate on images from the train split. Usable from a notebook::

    quantize_onnx_int8("model.onnx", "model.int8.onnx", calibration_images)
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from edgeopt.artifacts import Dataset, ModelArtifact, model_or_failure, new_workdir

log = logging.getLogger(__name__)


def calibration_subset(x_train: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` train images drawn without replacement (seeded)."""
    idx = np.random.default_rng(seed).permutation(len(x_train))[: min(n, len(x_train))]
    return np.ascontiguousarray(x_train[np.sort(idx)])


def quantize_onnx_int8(src: Path, dst: Path, calibration: np.ndarray, input_name: str = "input") -> Path:
    """ONNX Runtime static QDQ, S8S8, per-channel weights, MinMax calibration (ORT's first choice on x86)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{input_name: calibration[i : i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre), str(dst), Reader(),
            quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            per_channel=True, calibrate_method=CalibrationMethod.MinMax,
        )
    return dst


def quantize_openvino_int8(src_xml: Path, dst_xml: Path, calibration: np.ndarray) -> Path:
    """NNCF PTQ on the IR (performance preset: symmetric INT8 weights and activations)."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(src_xml))
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    q = nncf.quantize(
        model, dataset, preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(calibration),
    )
    ov.save_model(q, str(dst_xml), compress_to_fp16=False)
    return dst_xml


def quantize_model(model: ModelArtifact, scheme: str, dataset: Dataset, calibration_samples: int, seed: int = 0) -> ModelArtifact:
    """Quantize an FP32 ModelArtifact to ``scheme`` ('int8'), calibrating on train images.

    ONNX goes through ONNX Runtime static QDQ, OpenVINO IR through NNCF. 'fp32' returns the input.
    """
    if scheme == "fp32" or model.failed:
        return model
    if scheme != "int8":
        raise ValueError(f"unknown quantization scheme {scheme!r}; expected fp32 or int8")
    variant = model.variant.replace("-fp32-", f"-{scheme}-")
    recipe = {**model.manifest["recipe"], "scheme": scheme, "calibration_samples": calibration_samples}
    lineage = {**model.manifest.get("lineage", {}), "parent": model.variant}

    def build() -> ModelArtifact:
        calib = calibration_subset(dataset.split("train")[0], calibration_samples, seed)
        out = new_workdir(variant)
        if model.format == "onnx":
            quantize_onnx_int8(model.model_file, out / "model.onnx", calib)
            method = "onnxruntime static QDQ S8S8 per-channel MinMax"
        else:
            quantize_openvino_int8(model.model_file, out / "model.xml", calib)
            method = "NNCF PTQ preset=performance"
        art = ModelArtifact.write(out, {
            **{k: v for k, v in model.manifest.items() if k not in ("files", "kind", "parity_max_abs_diff")},
            "variant": variant, "recipe": recipe, "lineage": lineage, "method": method,
        })
        log.info("quantize: %s %.1f kB -> %.1f kB (%s)", variant, model.model_bytes / 1e3, art.model_bytes / 1e3, method)
        return art

    return model_or_failure(build, variant=variant, fmt=model.format, recipe=recipe, lineage=lineage)
