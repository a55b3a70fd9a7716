"""Precision schemes for an exported FP32 model: FP16, static INT8, dynamic INT8, accuracy-controlled INT8.

============  ==========================================  ===========================================
scheme        ONNX                                        OpenVINO IR
============  ==========================================  ===========================================
fp16          onnxruntime float16 converter (float32 I/O)  ``ov.save_model(compress_to_fp16=True)``
int8          ONNX Runtime static QDQ                      NNCF post-training quantization
int8-dynamic  ONNX Runtime ``quantize_dynamic``           (not supported: an ONNX Runtime technique)
int8-acc      NNCF accuracy control, ONNX backend          NNCF accuracy control, OpenVINO backend
============  ==========================================  ===========================================

Static schemes calibrate on images from the train split; accuracy control validates top-1 on the
val split with the model itself. Each function does one job and is usable from a notebook::

    quantize_onnx_int8("model.onnx", "model.int8.onnx", calibration_images, OrtQuantConfig())
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Tuple

import numpy as np

from edgeopt.artifacts import Dataset, ModelArtifact, model_or_failure, new_workdir
from edgeopt.config import SCHEMES_FOR_FORMAT, AccuracyControlConfig, NNCFQuantConfig, OrtQuantConfig, QuantConfig

log = logging.getLogger(__name__)

SCHEMES = SCHEMES_FOR_FORMAT["onnx"]
Predict = Callable[[np.ndarray], np.ndarray]


def calibration_subset(x_train: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` train images drawn without replacement (seeded)."""
    idx = np.random.default_rng(seed).permutation(len(x_train))[: min(n, len(x_train))]
    return np.ascontiguousarray(x_train[np.sort(idx)])


def _input_name(path: Path) -> str:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input[0].name


def _preprocessed(src: Path, tmp: str) -> str:
    """ONNX Runtime's recommended shape inference and graph optimization before quantizing."""
    from onnxruntime.quantization import quant_pre_process

    pre = str(Path(tmp) / "pre.onnx")
    quant_pre_process(str(src), pre, skip_symbolic_shape=True)
    return pre


CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}  # CalibrationMethod names
# The entropy (KL) search picks a threshold among the histogram's bins: quantize_static's own
# histogram (128 bins for 128 quantized bins) leaves it one candidate, the full range (= MinMax).
# 512 bins give it 193 candidates (TensorRT's 2048 give more, at 5x the search time).
CALIBRATOR_OPTIONS = {
    "minmax": {},
    "entropy": {"num_bins": 512, "num_quantized_bins": 128},
    "percentile": {"num_bins": 2048, "percentile": 99.999},
}


def calibrate_onnx(src: Path, cache: Path, calibration: np.ndarray, method: str = "minmax") -> Path:
    """ONNX Runtime calibration (minmax, entropy or percentile) of every tensor's range on
    ``calibration``, saved as ONNX Runtime's calibration cache (JSON) at ``cache``."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator, save_tensors_data

    name = _input_name(src)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{name: calibration[i : i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(
            str(src), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=CalibrationMethod[CALIBRATION_METHODS[method]], extra_options=CALIBRATOR_OPTIONS[method],
        )
        calibrator.collect_data(Reader())
        save_tensors_data(calibrator.compute_data(), cache)
    return cache


def quantize_onnx_int8(src: Path, dst: Path, calibration: np.ndarray, cfg: OrtQuantConfig = OrtQuantConfig()) -> Path:
    """ONNX Runtime static QDQ: INT8 weights, int8 (S8S8) or uint8 (U8S8) activations, calibrated with
    ``cfg.calibrate_method`` on ``calibration``; per-channel weight scales and 7-bit weights as asked."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    activation = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[cfg.activation_type]
    with tempfile.TemporaryDirectory() as tmp:
        pre = _preprocessed(src, tmp)
        cache = calibrate_onnx(Path(pre), Path(tmp) / "calibration.json", calibration, cfg.calibrate_method)
        quantize_static(
            pre, str(dst), None, quant_format=QuantFormat.QDQ, activation_type=activation,
            weight_type=QuantType.QInt8, per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
            calibrate_method=CalibrationMethod[CALIBRATION_METHODS[cfg.calibrate_method]],
            calibration_cache_path=str(cache),
        )
    return dst


def quantize_onnx_dynamic(src: Path, dst: Path, cfg: OrtQuantConfig = OrtQuantConfig()) -> Path:
    """ONNX Runtime dynamic quantization: INT8 weights, activations quantized at run time (no calibration)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        quantize_dynamic(_preprocessed(src, tmp), str(dst), per_channel=cfg.per_channel,
                         reduce_range=cfg.reduce_range, weight_type=QuantType.QInt8)
    return dst


def convert_onnx_fp16(src: Path, dst: Path) -> Path:
    """FP16 weights and activations inside the graph, float32 inputs and outputs (Cast nodes at the edges)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    return dst


def convert_openvino_fp16(src_xml: Path, dst_xml: Path) -> Path:
    """IR with FP16 weights (OpenVINO picks the compute precision per device)."""
    import openvino as ov

    ov.save_model(ov.Core().read_model(str(src_xml)), str(dst_xml), compress_to_fp16=True)
    return dst_xml


def _nncf_recipe(cfg: NNCFQuantConfig, n_calibration: int) -> Dict[str, Any]:
    """NNCF's options: the subset size is capped by the calibration set."""
    return {"preset": cfg.preset, "subset_size": min(cfg.subset_size, n_calibration),
            "fast_bias_correction": cfg.fast_bias_correction}


def _nncf_options(cfg: NNCFQuantConfig, n_calibration: int) -> Dict[str, Any]:
    import nncf

    return {**_nncf_recipe(cfg, n_calibration), "preset": nncf.QuantizationPreset(cfg.preset)}


def quantize_openvino_int8(src_xml: Path, dst_xml: Path, calibration: np.ndarray,
                           cfg: NNCFQuantConfig = NNCFQuantConfig()) -> Path:
    """NNCF post-training quantization of the IR (preset, subset size capped by the calibration set)."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(src_xml))
    q = nncf.quantize(model, nncf.Dataset(list(calibration[:, None])), **_nncf_options(cfg, len(calibration)))
    ov.save_model(q, str(dst_xml), compress_to_fp16=False)
    return dst_xml


def top1(predict: Predict, items: Iterable[Tuple[np.ndarray, int]]) -> Tuple[float, list]:
    """(top-1 accuracy, per-item correctness) of ``predict`` on (image batch of one, label) items."""
    hits = [float(int(predict(x).argmax(1)[0]) == int(y)) for x, y in items]
    return float(np.mean(hits)), hits


def _nncf_predictor(model) -> Predict:
    """A predict function for what NNCF's accuracy control hands the validation function: an
    OpenVINO CompiledModel (OpenVINO backend) or an onnx.ModelProto (ONNX backend, run on ORT)."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        import onnxruntime as ort

        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    return lambda x: model(x)[0]


def quantize_with_accuracy_control(src: Path, dst: Path, fmt: str, calibration: np.ndarray, x_val: np.ndarray,
                                   y_val: np.ndarray, nncf_cfg: NNCFQuantConfig = NNCFQuantConfig(),
                                   acc_cfg: AccuracyControlConfig = AccuracyControlConfig()) -> Path:
    """NNCF INT8 with accuracy control: quantize, then revert the layers that cost most accuracy to
    FP32 until the top-1 drop on ``(x_val, y_val)`` is at most ``acc_cfg.max_drop`` points
    (absolute), in at most ``acc_cfg.max_iterations`` reverts. ``fmt``: 'onnx' or 'openvino'."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    if fmt == "onnx":
        import onnx

        model = onnx.load(str(src))
        name = model.graph.input[0].name
        feed = lambda x: {name: x}  # noqa: E731 - the ONNX backend feeds dicts by input name
    else:
        import openvino as ov

        model = ov.Core().read_model(str(src))
        feed = lambda x: x  # noqa: E731
    val_items = [(x_val[i : i + 1], int(y_val[i])) for i in range(len(x_val))]
    q = nncf.quantize_with_accuracy_control(
        model, nncf.Dataset(list(calibration[:, None]), feed), nncf.Dataset(val_items, lambda item: feed(item[0])),
        lambda compiled, items: top1(_nncf_predictor(compiled), items),
        max_drop=acc_cfg.max_drop / 100, drop_type=nncf.DropType.ABSOLUTE, **_nncf_options(nncf_cfg, len(calibration)),
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
            max_num_iterations=acc_cfg.max_iterations),
    )
    if fmt == "onnx":
        onnx.save(q, str(dst))
    else:
        ov.save_model(q, str(dst), compress_to_fp16=False)
    return dst


def _check_scheme(scheme: str, fmt: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    if scheme not in SCHEMES_FOR_FORMAT[fmt]:
        raise ValueError(
            f"scheme {scheme!r} does not apply to format {fmt!r} (it supports {', '.join(SCHEMES_FOR_FORMAT[fmt])}); "
            f"int8-dynamic is an ONNX Runtime technique: use it on the ONNX export"
        )


def quant_recipe(scheme: str, fmt: str, qcfg: QuantConfig, n_calibration: int) -> Tuple[Dict[str, Any], str]:
    """(every option ``scheme`` uses on ``fmt``, a human-readable method name)."""
    ort_cfg, nncf_cfg, acc = qcfg.onnxruntime, qcfg.nncf, qcfg.accuracy_control
    nncf_opts = _nncf_recipe(nncf_cfg, n_calibration)
    backend = "ONNX" if fmt == "onnx" else "OpenVINO"
    if scheme == "fp16":
        opts = {"keep_io_types": True} if fmt == "onnx" else {"compress_to_fp16": True}
        method = "onnxruntime float16 converter (float32 I/O)" if fmt == "onnx" else "OpenVINO FP16 weight compression"
    elif scheme == "int8-dynamic":
        opts = {"weight_type": "int8", "per_channel": ort_cfg.per_channel, "reduce_range": ort_cfg.reduce_range}
        method = f"onnxruntime dynamic INT8{' per-channel' if ort_cfg.per_channel else ''}"
    elif scheme == "int8" and fmt == "onnx":
        opts = {"calibration_samples": n_calibration, "quant_format": "QDQ", "weight_type": "int8",
                **ort_cfg.model_dump(mode="json"), "calibrator_options": CALIBRATOR_OPTIONS[ort_cfg.calibrate_method]}
        kind = "S8S8" if ort_cfg.activation_type == "int8" else "U8S8"
        method = (f"onnxruntime static QDQ {kind}{' per-channel' if ort_cfg.per_channel else ''} "
                  f"{ort_cfg.calibrate_method}{' reduce-range' if ort_cfg.reduce_range else ''}")
    elif scheme == "int8":
        opts = {"calibration_samples": n_calibration, **nncf_opts}
        method = f"NNCF PTQ preset={nncf_cfg.preset}"
    else:
        opts = {"calibration_samples": n_calibration, **nncf_opts, "max_drop": acc.max_drop,
                "drop_type": "absolute", "max_iterations": acc.max_iterations, "metric": "top-1 val"}
        method = f"NNCF accuracy-controlled PTQ ({backend} backend) max_drop={acc.max_drop:g} points"
    return {"scheme": scheme, **opts}, method


def _val_accuracy(runtime: str, model_file: Path, x_val: np.ndarray, y_val: np.ndarray) -> float:
    from edgeopt.runtimes import make_predictor

    predict = make_predictor(runtime, model_file)
    return top1(predict, ((x_val[i : i + 1], y_val[i]) for i in range(len(x_val))))[0]


def quantize_model(model: ModelArtifact, scheme: str, dataset: Dataset, qcfg: QuantConfig,
                   seed: int = 0) -> ModelArtifact:
    """Turn an FP32 ModelArtifact into its ``scheme`` variant (fp32, fp16, int8, int8-dynamic, int8-acc).

    'fp32' returns the input. An unknown scheme, or one the format does not support, raises
    ValueError; any failure while building is recorded in a failed ModelArtifact instead.
    """
    _check_scheme(scheme, model.format)
    if scheme == "fp32":
        return model
    variant = model.variant.replace("-fp32-", f"-{scheme}-")
    n_calibration = min(qcfg.calibration_samples, dataset.manifest["sizes"]["train"])
    recipe, method = quant_recipe(scheme, model.format, qcfg, n_calibration)
    recipe = {**model.manifest["recipe"], **recipe}
    lineage = {**model.manifest.get("lineage", {}), "parent": model.variant}

    def build() -> ModelArtifact:
        if model.failed:
            raise RuntimeError(f"parent {model.variant} failed: {model.manifest['reason']}")
        src, out, is_onnx = model.model_file, new_workdir(variant), model.format == "onnx"
        dst = out / src.name
        calib = calibration_subset(dataset.split("train")[0], qcfg.calibration_samples, seed)
        extra: Dict[str, Any] = {}
        if scheme == "fp16":
            (convert_onnx_fp16 if is_onnx else convert_openvino_fp16)(src, dst)
        elif scheme == "int8-dynamic":
            quantize_onnx_dynamic(src, dst, qcfg.onnxruntime)
        elif scheme == "int8" and is_onnx:
            quantize_onnx_int8(src, dst, calib, qcfg.onnxruntime)
        elif scheme == "int8":
            quantize_openvino_int8(src, dst, calib, qcfg.nncf)
        else:
            x_val, y_val = dataset.split("val")
            quantize_with_accuracy_control(src, dst, model.format, calib, x_val, y_val, qcfg.nncf,
                                           qcfg.accuracy_control)
            runtime = "onnxruntime" if is_onnx else "openvino"
            fp32_acc, q_acc = (_val_accuracy(runtime, f, x_val, y_val) for f in (src, dst))
            extra = {"accuracy_control": {
                "val_accuracy_fp32": fp32_acc, "val_accuracy": q_acc, "drop_points": 100 * (fp32_acc - q_acc),
                "max_drop_points": qcfg.accuracy_control.max_drop, "runtime": runtime,
            }}
        art = ModelArtifact.write(out, {
            **{k: v for k, v in model.manifest.items() if k not in ("files", "kind", "parity_max_abs_diff")},
            "variant": variant, "recipe": recipe, "lineage": lineage, "method": method, **extra,
        })
        log.info("quantize: %s %.1f kB -> %.1f kB (%s)", variant, model.model_bytes / 1e3, art.model_bytes / 1e3,
                 method)
        return art

    return model_or_failure(build, variant=variant, fmt=model.format, recipe=recipe, lineage=lineage)
