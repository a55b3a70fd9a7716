"""The CPU's native precisions on OpenVINO (bf16, fp16-native, int8-bf16): refused or accepted at
validate by the CPU's flags (injected), and on this machine built, compiled with the precision their
file carries, and read back from OpenVINO as the precision it really used."""

import numpy as np
import pytest

from edgeopt import precisions
from edgeopt.config import ConfigError, QuantConfig
from edgeopt.measure.latency import cpu_info, measure_models
from edgeopt.models.export import export_checkpoint
from edgeopt.plan import check, parse_config
from edgeopt.precisions import quantize_model
from edgeopt.precisions.native import BF16_FLAGS, FP16_FLAGS
from edgeopt.runtimes import make_predictor
from edgeopt.runtimes.coverage import int8_coverage

CPU_FLAGS = cpu_info()[1]
HAS_BF16, HAS_FP16 = bool(CPU_FLAGS & set(BF16_FLAGS)), bool(CPU_FLAGS & set(FP16_FLAGS))
NATIVE = {"bf16": BF16_FLAGS, "fp16-native": FP16_FLAGS, "int8-bf16": BF16_FLAGS}


def with_quantization(tiny_raw, *names):
    return {**tiny_raw, "variants": {**tiny_raw["variants"], "quantization": ["fp32", *names]}}


def on_cpu(monkeypatch, *flags, model="Test CPU 9000"):
    monkeypatch.setattr(check, "cpu_info", lambda: (model, frozenset({"avx2", "avx512f", *flags})))


# ---------------------------------------------------------------- validate: the CPU's flags


@pytest.mark.parametrize("name", NATIVE)
def test_a_native_precision_is_refused_on_a_cpu_without_its_flags(monkeypatch, tiny_raw, name):
    on_cpu(monkeypatch, "avx512_vnni")
    with pytest.raises(ConfigError) as err:
        parse_config(with_quantization(tiny_raw, "int8", name), "tiny.yaml")
    a, b = NATIVE[name]
    assert str(err.value).startswith(f"tiny.yaml: variants.quantization.2: {name} needs a CPU with {a} or {b}; "
                                     "this CPU (Test CPU 9000) has neither") and "\n" not in str(err.value)


@pytest.mark.parametrize("name", NATIVE)
@pytest.mark.parametrize("which", [0, 1])
def test_a_native_precision_is_accepted_on_a_cpu_with_either_flag(monkeypatch, tiny_raw, name, which):
    on_cpu(monkeypatch, NATIVE[name][which])
    cfg = parse_config(with_quantization(tiny_raw, name))
    assert cfg.variants.quantization == ["fp32", name]
    assert [b.precision for b in check.variant_plan(cfg).builds if b.format == "openvino"] == ["fp32", name] * 2


@pytest.mark.parametrize("flags, expected", [
    ((), ["fp32", "int8"]),
    (("avx512_bf16",), ["fp32", "bf16", "int8-bf16", "int8"]),
    (("amx_bf16", "amx_fp16"), ["fp32", "bf16", "fp16-native", "int8-bf16", "int8"]),
])
def test_native_stands_for_the_native_precisions_this_cpu_has(monkeypatch, tiny_raw, flags, expected):
    on_cpu(monkeypatch, *flags)
    assert parse_config(with_quantization(tiny_raw, "native", "int8")).variants.quantization == expected
    if flags:  # one listed already is not listed twice
        listed = parse_config(with_quantization(tiny_raw, "bf16", "native")).variants.quantization
        assert listed.count("bf16") == 1 and set(listed) == set(expected) - {"int8"}


def test_the_other_precisions_need_no_flag_and_unreadable_flags_refuse_with_that_reason(monkeypatch, tiny_raw):
    monkeypatch.setattr(check, "cpu_info", lambda: ("unknown", frozenset()))
    assert parse_config(with_quantization(tiny_raw, "fp16", "int8", "int8-acc")).variants.quantization[-1] == "int8-acc"
    with pytest.raises(ConfigError, match=r"variants.quantization.1: bf16 needs a CPU with avx512_bf16 or amx_bf16; "
                                          r"this CPU's flags cannot be read \(/proc/cpuinfo\)"):
        parse_config(with_quantization(tiny_raw, "bf16"))
    assert [p for p in precisions.REGISTRY if precisions.get(p).cpu_flags] == list(NATIVE)
    assert all(precisions.formats_for(p) == ("openvino",) for p in NATIVE)


# ---------------------------------------------------------------- on this machine: built, compiled, read back

slow = pytest.mark.slow  # trains, exports and quantizes models


@pytest.fixture(scope="module")
def fp32_ir(digits, student_ckpt):
    return export_checkpoint(student_ckpt, "openvino", digits, "student-fp32-openvino")


def quant() -> QuantConfig:
    return QuantConfig(calibration_samples=32, nncf={"ignore_first": True})  # a float layer for bf16 to run


def rt_hint(art):
    from edgeopt.runtimes.openvino import file_precision, ov_core

    return file_precision(ov_core().read_model(str(art.model_file)))


def evaluated(digits, **arts):
    """The evaluate protocol (the one the edge agent runs too) on the val split, on OpenVINO."""
    x = digits.split("val")[0]
    return measure_models({k: ("openvino", a.model_file) for k, a in arts.items()}, lambda: [x], x[:1],
                          threads=1, batch=1, warmup=1, iterations=5, rounds=1)


@slow
@pytest.mark.skipif(not HAS_BF16, reason=f"this CPU has neither {' nor '.join(BF16_FLAGS)}")
def test_bf16_runs_in_bf16_on_openvino_and_keeps_fp32_accuracy(digits, fp32_ir):
    art = quantize_model(fp32_ir, "bf16", digits, quant(), 0, "student-bf16-openvino")
    assert not art.failed, art.manifest.get("reason")
    assert art.manifest["recipe"]["inference_precision"] == "bf16" and art.manifest["recipe"]["weights"] == "fp16"
    assert art.manifest["lineage"]["parent"] == fp32_ir.variant and "bf16 inference" in art.manifest["method"]
    bin_bytes = lambda a: a.manifest["files"]["model.bin"]["bytes"]  # noqa: E731
    assert 0.45 < bin_bytes(art) / bin_bytes(fp32_ir) < 0.55  # FP16 weights: half the file
    assert rt_hint(art) == "bf16" and rt_hint(fp32_ir) is None  # the file carries its precision; FP32 none
    got = evaluated(digits, fp32=fp32_ir, bf16=art)
    assert got["fp32"].settings["precision"] == "f32" and got["bf16"].settings["precision"] == "bf16"
    assert got["bf16"].settings["precision_hint"] == "bf16" and got["bf16"].latency is not None
    assert make_predictor("openvino", art.model_file).settings["precision"] == "bf16"  # what the server builds
    y = digits.labels("val")
    acc = {k: float((m.predictions == y).mean()) for k, m in got.items()}
    assert acc["fp32"] > 0.8 and abs(acc["bf16"] - acc["fp32"]) <= 0.02
    assert float((got["bf16"].predictions == got["fp32"].predictions).mean()) > 0.98
    x = digits.split("val")[0][:64]
    ref = make_predictor("openvino", fp32_ir.model_file).predict_batched(x)
    out = make_predictor("openvino", art.model_file).predict_batched(x)
    assert 0 < np.abs(out - ref).max() < 0.1 * np.abs(ref).max()  # bf16 differs from f32, a little
    from edgeopt.runtimes.openvino import OpenVINOPredictor

    assert OpenVINOPredictor(art.model_file, precision="f32").settings["precision"] == "f32"  # an explicit hint wins


@slow
@pytest.mark.skipif(not HAS_BF16, reason=f"this CPU has neither {' nor '.join(BF16_FLAGS)}")
def test_int8_bf16_is_the_int8_ir_with_its_float_layers_in_bf16(digits, fp32_ir):
    int8 = quantize_model(fp32_ir, "int8", digits, quant(), 0, "student-int8-openvino")
    mix = quantize_model(fp32_ir, "int8-bf16", digits, quant(), 0, "student-int8-bf16-openvino")
    assert not mix.failed, mix.manifest.get("reason")
    r = {k: v for k, v in mix.manifest["recipe"].items() if k not in ("scheme", "inference_precision")}
    assert r == {k: v for k, v in int8.manifest["recipe"].items() if k != "scheme"}  # the int8 recipe's options
    assert mix.manifest["recipe"]["inference_precision"] == "bf16" and mix.manifest["nncf"] == int8.manifest["nncf"]
    assert mix.manifest["method"] == f"{int8.manifest['method']}, float layers in bf16"
    assert rt_hint(mix) == "bf16" and rt_hint(int8) is None
    got = evaluated(digits, int8=int8, mix=mix, fp32=fp32_ir)
    assert got["int8"].settings["precision"] == "f32" and got["mix"].settings["precision"] == "bf16"
    assert int8_coverage("openvino", mix.model_file) == int8_coverage("openvino", int8.model_file) == {
        "int8_ops": 3, "float_ops": 1, "int8_fraction": 0.75}  # the first layer: in float (bf16 here)
    assert float((got["mix"].predictions == got["fp32"].predictions).mean()) > 0.9


@slow
def test_fp16_native_carries_f16_and_the_precision_recorded_is_the_one_openvino_used(digits, fp32_ir):
    art = quantize_model(fp32_ir, "fp16-native", digits, quant(), 0, "student-fp16-native-openvino")
    assert not art.failed and rt_hint(art) == "f16" and art.manifest["recipe"]["inference_precision"] == "f16"
    settings = make_predictor("openvino", art.model_file).settings
    assert settings["precision_hint"] == "f16"
    if not HAS_FP16:  # OpenVINO compiles the f16 hint to what this CPU has, and that is what is recorded
        assert settings["precision"] == ("bf16" if HAS_BF16 else "f32")
        pytest.skip(f"this CPU has neither {' nor '.join(FP16_FLAGS)}: native f16 not run")
    assert settings["precision"] == "f16"
    got = evaluated(digits, fp32=fp32_ir, f16=art)
    assert float((got["f16"].predictions == got["fp32"].predictions).mean()) > 0.98
