"""LiteRT (.tflite) as a format, a runtime and INT8/FP16 recipes, on digits.

The converter (litert-torch) runs in its own environment (scripts/setup.sh: .venv/litert) as a
subprocess; the runtime (ai-edge-litert) runs here. Every kind of base exports to a ``.tflite``
checked against its torch model; INT8 runs in INT8 behind float32 I/O, and a file with int8 input
and output is quantized and dequantized by the predictor; NHWC input is an option; an operator the converter cannot lower fails that
variant with the operator named; an agent that has only ai-edge-litert measures a ``.tflite``; the
pipeline builds, measures and tabulates both edge formats next to ONNX.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeopt.agent.targets import evaluate_on_device
from edgeopt.config import QuantConfig, TargetConfig
from edgeopt.formats import tflite
from edgeopt.measure.evaluate import evaluate_variants
from edgeopt.models import export as export_module
from edgeopt.models.export import export_checkpoint
from edgeopt.models.zoo import load_checkpoint
from edgeopt.plan import parse_config
from edgeopt.precisions import quantize_model
from edgeopt.runtimes import make_predictor
from edgeopt.runtimes.coverage import int8_coverage
from edgeopt.runtimes.litert import LiteRTPredictor, dequantize, quantize
from tests import test_agent
from tests._edge import KINDS, AdaptiveMaxPool, accuracy, bases, files

FMT, RT = "tflite", "litert"
pytestmark = pytest.mark.slow  # each export runs the converter in its own interpreter (about 10 s of imports)


@pytest.fixture(scope="module")
def student_tflite(digits, student_ckpt):
    """The student in FP32, INT8 and FP16 .tflite."""
    fp32 = export_checkpoint(student_ckpt, FMT, digits, "student-fp32-tflite")
    quant = QuantConfig(calibration_samples=64)
    return {"fp32": fp32, **{p: quantize_model(fp32, p, digits, quant, 0, f"student-{p}-tflite") for p in ("int8", "fp16")}}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_base_exports_to_tflite_checked_against_its_model(kind, digits, teacher_ckpt, student_ckpt):
    base = bases(digits, teacher_ckpt, student_ckpt)[kind]
    art = export_checkpoint(base, FMT, digits, f"{kind}-fp32-tflite")
    assert not art.failed, art.manifest["reason"]
    assert files(art.path) == {"model.tflite", "manifest.json"}
    assert art.manifest["parity_max_abs_diff"] < 1e-3 and art.manifest["layout"] == "NCHW"
    p = make_predictor(RT, art.model_file)
    assert p.fixed_batch == 1 and p.settings["io"] == "float32"
    with torch.inference_mode():
        want = accuracy(lambda x: load_checkpoint(base)(torch.from_numpy(x)).numpy(), digits)
    assert abs(accuracy(p.predict_batched, digits) - want) < 0.005 and want > 0.8


def test_int8_runs_int8_inside_float_io_and_fp16_stores_fp16_weights(student_tflite, digits):
    fp32, int8, fp16 = (student_tflite[p] for p in ("fp32", "int8", "fp16"))
    assert not int8.failed and not fp16.failed, (int8.manifest.get("reason"), fp16.manifest.get("reason"))
    p8 = LiteRTPredictor(int8.model_file)
    ops = [op["op_name"] for op in p8.interpreter._get_ops_details()]
    assert ops[0] == "QUANTIZE" and "DEQUANTIZE" in ops and p8.settings["io"] == "float32"
    assert int8.manifest["recipe"]["quantizer"] == "ai-edge-quantizer static_wi8_ai8"
    assert int8_coverage(RT, int8.model_file)["int8_fraction"] == 1.0
    assert int8_coverage(RT, fp32.model_file)["int8_ops"] == 0 == int8_coverage(RT, fp16.model_file)["int8_ops"]
    assert int8.model_bytes < 0.6 * fp32.model_bytes and fp16.model_bytes < 0.8 * fp32.model_bytes  # a tiny model
    weights = {np.dtype(t["dtype"]).name for t in LiteRTPredictor(fp16.model_file).interpreter.get_tensor_details()}
    assert "float16" in weights and LiteRTPredictor(fp16.model_file).settings["io"] == "float32"
    acc = {a.variant: accuracy(make_predictor(RT, a.model_file).predict_batched, digits) for a in (fp32, int8, fp16)}
    assert acc["student-int8-tflite"] > acc["student-fp32-tflite"] - 0.02, acc
    assert abs(acc["student-fp16-tflite"] - acc["student-fp32-tflite"]) < 0.005, acc


def test_a_file_with_int8_input_and_output_is_quantized_and_dequantized(student_tflite, digits, tmp_path):
    int8_io = tmp_path / "model.tflite"
    tflite.quantize(student_tflite["fp32"].model_file, int8_io, "int8", digits.sample("train", 64), int8_io=True)
    p = LiteRTPredictor(int8_io)
    assert p.input["dtype"] == np.int8 and p.output["dtype"] == np.int8 and p.settings["io"] == "int8"
    assert "QUANTIZE" not in [op["op_name"] for op in p.interpreter._get_ops_details()]
    # the same INT8 model as the recipe's float-I/O one: logits dequantized, not int8 codes
    x = digits.split("val")[0][:32]
    inside = make_predictor(RT, student_tflite["int8"].model_file).predict_batched(x)
    assert np.abs(p.predict_batched(x) - inside).max() < 0.5
    assert accuracy(p.predict_batched, digits) > accuracy(make_predictor(RT, student_tflite["fp32"].model_file)
                                                          .predict_batched, digits) - 0.02


def test_quantize_and_dequantize_use_the_tensors_scale_and_zero_point():
    detail = {"dtype": np.int8, "quantization": (0.5, -3)}
    q = quantize(np.array([[-100.0, -1.0, 0.0, 0.74, 100.0]], np.float32), detail)
    assert q.dtype == np.int8 and q.tolist() == [[-128, -5, -3, -2, 127]]  # round(x / 0.5) - 3, clipped
    assert dequantize(q, detail).tolist() == [[-62.5, -1.0, 0.0, 0.5, 65.0]]
    f = {"dtype": np.float32, "quantization": (0.0, 0)}
    assert quantize(np.ones((1, 2), np.float64), f).dtype == np.float32


def test_nhwc_input_is_an_option(digits, student_ckpt, student_tflite):
    art = export_checkpoint(student_ckpt, "tflite-nhwc", digits, "student-fp32-tflite-nhwc")
    assert not art.failed, art.manifest["reason"]
    p = LiteRTPredictor(art.model_file)
    assert art.manifest["layout"] == "NHWC" and p.settings["layout"] == "NHWC"
    assert list(p.input["shape"]) == [1, 8, 8, 1] and p.input["name"].endswith("images_nhwc")
    x = digits.split("val")[0][:16]
    nchw = make_predictor(RT, student_tflite["fp32"].model_file)
    np.testing.assert_allclose(p.predict_batched(x), nchw.predict_batched(x), atol=1e-4)
    int8 = quantize_model(art, "int8", digits, QuantConfig(calibration_samples=64), 0, "student-int8-tflite-nhwc")
    assert not int8.failed and accuracy(make_predictor(RT, int8.model_file).predict_batched, digits) > 0.8


def test_an_operator_the_converter_cannot_lower_fails_that_variant_naming_it(digits, student_ckpt, monkeypatch):
    monkeypatch.setattr(export_module, "load_checkpoint", lambda ckpt: AdaptiveMaxPool().eval())
    art = export_checkpoint(student_ckpt, FMT, digits, "student-fp32-tflite")
    assert art.failed
    assert art.manifest["reason"].startswith("UnsupportedOperator: LiteRT cannot take operator "
                                             "aten.adaptive_max_pool2d.default: Lowering not found"), art.manifest


def test_without_the_converter_environment_the_variant_fails_in_one_line(digits, student_ckpt, monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEOPT_LITERT_PYTHON", str(tmp_path / "missing" / "python"))
    art = export_checkpoint(student_ckpt, FMT, digits, "student-fp32-tflite")
    assert art.failed and art.manifest["reason"] == (
        f"RuntimeError: the LiteRT converter environment is missing ({tmp_path / 'missing' / 'python'}): run "
        "scripts/setup.sh, or set EDGEOPT_LITERT_PYTHON to a Python with litert-torch 0.10.0 and this torch")


LITERT_ONLY = test_agent.BLOCKER.replace('BLOCKED = {"torch", "torchvision", "zenml", "mlflow", "sklearn", "nncf"}',
                                         'BLOCKED = {"torch", "torchvision", "zenml", "mlflow", "sklearn", "nncf", '
                                         '"onnx", "onnxruntime", "openvino", "executorch"}')


def test_an_agent_with_only_ai_edge_litert_measures_a_tflite(student_tflite, digits, tmp_path, monkeypatch):
    assert LITERT_ONLY != test_agent.BLOCKER
    monkeypatch.setattr(test_agent, "BLOCKER", LITERT_ONLY)
    agent = test_agent.AgentProcess(tmp_path, "c")  # offers what it has: litert alone
    try:
        about = agent.client().info()
        assert about["runtimes"] == [RT] and about["fingerprint"]["ai-edge-litert"] == "2.3.0"
        models = [student_tflite["fp32"], student_tflite["int8"]]
        evaluations = {m.variant: [RT] for m in models}
        target = TargetConfig(warmup=2, iterations=20)
        ev = evaluate_on_device(models, evaluations, digits, "student-fp32-tflite@litert", target,
                                test_agent.target(agent))
        here = evaluate_variants(models, evaluations, digits, "student-fp32-tflite@litert", target)
    finally:
        agent.stop()
    assert ev.error is None and all(r.ok for r in ev.results), [r.reason for r in ev.results]
    for name in ("student-fp32-tflite@litert", "student-int8-tflite@litert"):
        there, local = ev.result(name), here.result(name)
        assert there.metrics["accuracy"] == local.metrics["accuracy"]
        assert there.metrics["int8_fraction"] == local.metrics["int8_fraction"]
        assert there.runtime_settings["io"] == local.runtime_settings["io"]
    assert ev.result("student-int8-tflite@litert").metrics["int8_fraction"] == 1.0


def test_the_pipeline_builds_measures_and_tabulates_both_edge_formats(tiny_raw, state_dir):
    from edgeopt_zenml.pipelines.runner import run_pipeline

    raw = {**tiny_raw, "name": "edge",
           "variants": {"bases": ["student"], "quantization": ["fp32", "int8"],
                        "formats": ["onnx", "tflite", "tflite-nhwc", "executorch"],
                        "runtimes": ["onnxruntime", "litert", "executorch"],
                        "quant": {"calibration_samples": 64}},
           "registry": {"name": "edge-model"}, "tracking": {**tiny_raw["tracking"], "experiment": "edge"},
           "deploy": {"root": str(state_dir / "deploy-edge"), "keep": 2}}
    out = run_pipeline(parse_config(raw, "edge"), run_name="edge-formats")
    ev = out["evaluation"]
    m = {r.variant: r for r in ev.results}
    assert all(r.ok for r in ev.results), [r.reason for r in ev.results if not r.ok]
    for fmt, rt in (("tflite", "litert"), ("tflite-nhwc", "litert"), ("executorch", "executorch")):
        fp32, int8 = m[f"student-fp32-{fmt}@{rt}"], m[f"student-int8-{fmt}@{rt}"]
        assert int8.metrics["int8_fraction"] == 1.0 and fp32.metrics["int8_fraction"] == 0.0
        assert int8.metrics["size_mb"] < 0.7 * fp32.metrics["size_mb"]
        assert "speedup_vs_fp32" in int8.metrics and int8.runtime_settings["threads"] == 1
        onnx = m["student-fp32-onnx@onnxruntime"].metrics["test_accuracy"]
        assert abs(fp32.metrics["test_accuracy"] - onnx) < 0.005 and int8.metrics["test_accuracy"] > onnx - 0.02
        assert f"student-int8-{fmt}@{rt}" in out["table"]
