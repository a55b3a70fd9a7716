"""Every precision recipe on small data, each asserting its real effect on the model file and on
what the runtime executes; the registry; the options' config errors."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgeopt import precisions
from edgeopt.config import ConfigError, QuantConfig
from edgeopt.config.quant import NNCFOptions, RecipeOptions
from edgeopt.models.export import export_checkpoint
from edgeopt.models.zoo import load_checkpoint, save_checkpoint
from edgeopt.plan import parse_config
from edgeopt.precisions import Inputs, Precision, get, nncf_backend, ort, quantize_model
from edgeopt.runtimes import make_predictor
from edgeopt.runtimes.coverage import int8_coverage

pytestmark = pytest.mark.slow  # trains, exports and quantizes models (docs/tests.md: the inner loop skips them)

SHAPE = [1, 8, 8]
X86 = ort.cpu()[0] == "x86"


@pytest.fixture(scope="module")
def fp32_onnx(digits, student_ckpt):
    return export_checkpoint(student_ckpt, "onnx", digits, "student-fp32-onnx")


@pytest.fixture(scope="module")
def fp32_ir(digits, student_ckpt):
    return export_checkpoint(student_ckpt, "openvino", digits, "student-fp32-openvino")


def quant(**kw) -> QuantConfig:
    return QuantConfig(calibration_samples=32, **kw)


def graph(art):
    return onnx.load(str(art.model_file)).graph


def inits(g):
    return {t.name: numpy_helper.to_array(t) for t in g.initializer}


def consumer_inputs(g, op_type):
    return [n.input for n in g.node if n.op_type == op_type]


def val_predictions(art, runtime, digits):
    return make_predictor(runtime, art.model_file).predict_batched(digits.split("val")[0])


def agreement(art, ref, runtime, digits) -> float:
    return float((val_predictions(art, runtime, digits).argmax(1) == val_predictions(ref, runtime, digits).argmax(1))
                 .mean())


# ---------------------------------------------------------------- int8 on ONNX: ONNX Runtime static QDQ


@pytest.mark.skipif(not X86, reason="the uint8 default and QLinearConv fusion are x86 facts")
def test_int8_onnx_default_is_u8s8_and_onnxruntime_runs_every_layer_in_int8(digits, teacher_ckpt):
    """On a residual net: the default (uint8 activations) fuses every conv; int8 activations leave
    the ones next to a fan-out in float, which is why the default is not ORT's S8S8."""
    fp32 = export_checkpoint(teacher_ckpt, "onnx", digits, "teacher-fp32-onnx")
    u8 = quantize_model(fp32, "int8", digits, quant(), 0, "teacher-int8-onnx")
    s8 = quantize_model(fp32, "int8", digits, quant(onnxruntime={"activation_type": "int8"}), 0, "teacher-s8-onnx")
    assert u8.variant == "teacher-int8-onnx" and u8.manifest["lineage"]["parent"] == "teacher-fp32-onnx"
    r = u8.manifest["recipe"]
    vnni = bool(ort.cpu()[1] & ort.VNNI)
    assert r["scheme"] == "int8" and r["activation_type"] == "uint8" and r["reduce_range"] is (not vnni)
    assert r["resolved_for_cpu"].startswith("x86") and "U8S8 per-channel minmax" in u8.manifest["method"]
    g, values = graph(u8), inits(graph(u8))
    assert {values[i[2]].dtype for i in consumer_inputs(g, "QuantizeLinear")} == {np.dtype(np.uint8)}
    full, mixed, none = (int8_coverage("onnxruntime", a.model_file) for a in (u8, s8, fp32))
    layers = none["float_ops"]  # every conv and the classifier
    assert none["int8_ops"] == 0 and layers >= 10
    assert full == {"int8_ops": layers, "float_ops": 0, "int8_fraction": 1.0}
    assert 0 < mixed["int8_ops"] < layers and mixed["float_ops"] > 0
    assert agreement(u8, fp32, "onnxruntime", digits) > 0.9
    assert int8_coverage("openvino", u8.model_file)["int8_fraction"] == 1.0  # the same file runs INT8 on OpenVINO


def test_int8_onnx_s8s8_per_tensor_reduce_range(digits, fp32_onnx):
    art = quantize_model(fp32_onnx, "int8", digits, quant(onnxruntime={
        "activation_type": "int8", "per_channel": False, "reduce_range": True}), 0, "student-int8-onnx")
    r = art.manifest["recipe"]
    assert r["activation_type"] == "int8" and r["reduce_range"] is True and "resolved_for_cpu" not in r
    assert "S8S8 minmax reduce-range" in art.manifest["method"]
    g, values = graph(art), inits(graph(art))
    assert all(values[i[2]].dtype == np.int8 for i in consumer_inputs(g, "QuantizeLinear"))
    weight_dq = [i for i in consumer_inputs(g, "DequantizeLinear") if values.get(i[0], np.zeros(0)).ndim == 4]
    assert weight_dq and all(values[i[1]].size == 1 for i in weight_dq)  # per-tensor scales
    assert max(int(np.abs(values[i[0]].astype(np.int32)).max()) for i in weight_dq) <= 64  # 7-bit weights
    assert agreement(art, fp32_onnx, "onnxruntime", digits) > 0.9


def test_int8_files_are_smaller_in_both_formats(digits, fp32_onnx, fp32_ir):
    onnx_int8 = quantize_model(fp32_onnx, "int8", digits, quant(), 0, "student-int8-onnx")
    g = graph(onnx_int8)
    assert [t for t in g.initializer if t.data_type == onnx.TensorProto.INT8]
    weight_bytes = lambda g: sum(len(t.raw_data) or 4 * len(t.float_data) for t in g.initializer)  # noqa: E731
    assert weight_bytes(g) < 0.5 * weight_bytes(graph(fp32_onnx)) and onnx_int8.model_bytes < 0.8 * fp32_onnx.model_bytes
    ir_int8 = quantize_model(fp32_ir, "int8", digits, quant(), 0, "student-int8-openvino")
    bin_bytes = lambda a: a.manifest["files"]["model.bin"]["bytes"]  # noqa: E731 - the weights; .xml is the graph
    assert bin_bytes(ir_int8) < 0.6 * bin_bytes(fp32_ir) and ir_int8.manifest["lineage"]["parent"] == fp32_ir.variant


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibrations_give_other_ranges(digits, fp32_onnx, method):
    minmax = quantize_model(fp32_onnx, "int8", digits, quant(), 0, "student-int8-onnx")
    art = quantize_model(fp32_onnx, "int8", digits, quant(onnxruntime={"calibrate_method": method}), 0, "h-int8-onnx")
    assert not art.failed and art.manifest["recipe"]["calibrate_method"] == method
    scales = lambda a: {k: float(v) for k, v in inits(graph(a)).items()  # noqa: E731 - activation scales
                        if k.endswith("_scale") and v.size == 1}
    assert scales(art) != scales(minmax)
    assert agreement(art, fp32_onnx, "onnxruntime", digits) > 0.9


@pytest.mark.parametrize("family,flags,activation,reduce", [
    ("x86", {"avx2", "avx512f"}, "uint8", True),
    ("x86", {"avx2", "avx_vnni"}, "uint8", False),
    ("arm", {"asimddp"}, "int8", False),
])
def test_auto_activation_type_and_reduce_range_follow_the_cpu(monkeypatch, family, flags, activation, reduce):
    monkeypatch.setattr(ort, "cpu", lambda: (family, frozenset(flags)))
    used, method = ort.static_recipe(ort.OrtOptions(), 100)
    assert (used["activation_type"], used["reduce_range"]) == (activation, reduce)
    assert used["resolved_for_cpu"].split()[0] == family
    assert ort.static_recipe(ort.OrtOptions(activation_type="uint8", reduce_range=False), 100)[0]["reduce_range"] is False


# ---------------------------------------------------------------- int8-dynamic, fp16


def test_dynamic_int8_quantizes_matmuls_by_default_and_convs_on_request(digits, fp32_onnx, fp32_ir):
    art = quantize_model(fp32_onnx, "int8-dynamic", digits, quant(), 0, "student-int8-dynamic-onnx")
    ops = {n.op_type for n in graph(art).node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear"} and "ConvInteger" not in ops
    assert art.manifest["recipe"]["op_types"] == ["MatMul"]
    convs = quantize_model(fp32_onnx, "int8-dynamic", digits, quant(onnxruntime={"dynamic_op_types": ["Conv"]}), 0,
                           "student-int8-dynamic-conv-onnx")
    assert "ConvInteger" in {n.op_type for n in graph(convs).node}
    assert int8_coverage("onnxruntime", convs.model_file)["int8_ops"] >= 3
    for a in (art, convs):
        assert agreement(a, fp32_onnx, "onnxruntime", digits) > 0.9
    with pytest.raises(ValueError, match="'int8-dynamic' has no implementation for format 'openvino'"):
        quantize_model(fp32_ir, "int8-dynamic", digits, quant(), 0, "student-int8-dynamic-openvino")


def float_bytes(g):
    return sum(v.nbytes for v in inits(g).values() if v.dtype.kind == "f")


def test_fp16_halves_weights_and_keeps_outputs(digits, fp32_onnx, fp32_ir):
    half = quantize_model(fp32_onnx, "fp16", digits, quant(), 0, "student-fp16-onnx")
    g = graph(half)
    assert float_bytes(g) < 0.55 * float_bytes(graph(fp32_onnx))
    assert {t.type.tensor_type.elem_type for t in (*g.input, *g.output)} == {onnx.TensorProto.FLOAT}
    ir_half = quantize_model(fp32_ir, "fp16", digits, quant(), 0, "student-fp16-openvino")
    bin_bytes = lambda a: a.manifest["files"]["model.bin"]["bytes"]  # noqa: E731
    assert bin_bytes(ir_half) < 0.55 * bin_bytes(fp32_ir) and ir_half.manifest["method"].startswith("OpenVINO FP16")
    ref = val_predictions(fp32_onnx, "onnxruntime", digits)
    for art, runtime in ((half, "onnxruntime"), (half, "openvino"), (ir_half, "openvino")):
        out = val_predictions(art, runtime, digits)
        assert np.abs(out - ref).max() < 0.05 and (out.argmax(1) == ref.argmax(1)).mean() > 0.99


# ---------------------------------------------------------------- int8 on IR: NNCF


def int8_weight_layers(art):
    """Names of the conv / matmul layers of the IR whose weights are stored as INT8 constants."""
    import openvino as ov

    def int8_constant(node, depth=4):  # through the Convert / Subtract / Multiply that dequantize it
        if node.get_type_name() == "Constant":
            return node.get_element_type() == ov.Type.i8
        return depth > 0 and any(int8_constant(v.get_node(), depth - 1) for v in node.input_values())

    model = ov.Core().read_model(str(art.model_file))
    return {op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_type_name() in ("Convolution", "MatMul") and int8_constant(op.input_value(1).get_node())}


def test_nncf_keeps_the_first_layer_in_float_and_the_last_on_request(digits, fp32_ir):
    backend = nncf_backend.BACKENDS["openvino"]
    layers, attention = backend.layers(backend.load(fp32_ir.model_file))
    names = [layer.name for layer in layers]
    assert len(names) == 4 and not attention and not any(layer.int8 for layer in layers)  # 3 convs + classifier
    art = quantize_model(fp32_ir, "int8", digits, quant(nncf={"ignore_first": True}), 0, "student-int8-openvino")
    every = quantize_model(fp32_ir, "int8", digits, quant(nncf={"ignore_first": False}), 0, "all-int8-openvino")
    ends = quantize_model(fp32_ir, "int8", digits, quant(nncf={"ignore_first": True, "ignore_last": True}), 0,
                          "ends-int8-openvino")
    n = art.manifest["nncf"]
    assert n["ignored_layers"] == names[:1] and n["model_type"] == "cnn" and not n["smooth_quant"]
    assert ends.manifest["nncf"]["ignored_layers"] == [names[0], names[-1]] and every.manifest["nncf"]["ignored_layers"] == []
    r = art.manifest["recipe"]
    assert r["ignore_first"] is True and r["ignore_last"] is False and r["bias_correction"] == "full"
    assert r["subset_size"] == 32 and "first layer in float" in art.manifest["method"]
    assert int8_weight_layers(art) == set(names[1:]) and int8_weight_layers(every) == set(names)
    assert int8_weight_layers(ends) == set(names[1:-1])
    assert {layer.name for layer in backend.layers(backend.load(ends.model_file))[0] if layer.int8} == set(names[1:-1])
    assert int8_coverage("openvino", art.model_file) == {"int8_ops": 3, "float_ops": 1, "int8_fraction": 0.75}
    assert int8_coverage("openvino", every.model_file)["int8_fraction"] == 1.0
    assert int8_coverage("openvino", fp32_ir.model_file)["int8_ops"] == 0
    for a in (art, every, ends):
        assert agreement(a, fp32_ir, "openvino", digits) > 0.9


@pytest.mark.parametrize("preset", ["performance", "mixed"])
def test_nncf_presets_set_activation_symmetry(digits, fp32_ir, preset):
    import openvino as ov

    art = quantize_model(fp32_ir, "int8", digits, quant(nncf={"preset": preset, "ignore_first": False}), 0,
                         f"{preset}-int8-openvino")
    fq = [op for op in ov.Core().read_model(str(art.model_file)).get_ordered_ops()
          if op.get_type_name() == "FakeQuantize"]
    low, high = (float(fq[0].input_value(i).get_node().get_data().ravel()[0]) for i in (1, 2))  # the input's
    assert (low == pytest.approx(-high, rel=0.02)) == (preset == "performance")  # mixed: asymmetric activations
    assert agreement(art, fp32_ir, "openvino", digits) > 0.9


def test_nncf_model_type_is_transformer_only_for_attention():
    """A MatMul of two activations (attention) makes the model a transformer for NNCF (and turns its
    SmoothQuant on); a CNN's MatMul with a weight does not."""
    import tempfile

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.head = torch.nn.Linear(8, 24), torch.nn.Linear(8, 3)

        def forward(self, x):  # x: N x 4 x 8 tokens
            q, k, v = self.qkv(x).chunk(3, -1)
            return self.head(((q @ k.transpose(1, 2)).softmax(-1) @ v).mean(1))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "attn.onnx"
        torch.onnx.export(Attention().eval(), torch.zeros(1, 4, 8), str(path), dynamo=False, opset_version=17)
        backend = nncf_backend.BACKENDS["onnx"]
        model = backend.load(path)
        layers, attention = backend.layers(model)
        assert attention and len(layers) == 2  # the two Linear layers; q @ k and attn @ v are not layers
        kwargs, resolved = nncf_backend.arguments(NNCFOptions(ignore_first=True), model, "onnx", 16)
        assert resolved["model_type"] == "transformer" and resolved["smooth_quant"] and kwargs["model_type"] is not None
        assert resolved["ignored_layers"] == [layers[0].name]  # the first layer, as asked
        assert nncf_backend.arguments(NNCFOptions(), model, "onnx", 16)[1]["ignored_layers"] == []  # auto, unmeasured
        _, forced = nncf_backend.arguments(NNCFOptions(model_type="cnn"), model, "onnx", 16)
        assert forced["model_type"] == "cnn" and not forced["smooth_quant"]


# ---------------------------------------------------------------- int8-acc: NNCF accuracy control


@pytest.fixture(scope="module")
def outlier_student(student_ckpt):
    """The student with one channel's activations scaled by 1000 and the next conv scaled back:
    the same function in FP32, but per-tensor INT8 of that activation loses all other channels."""
    model = load_checkpoint(student_ckpt)
    with torch.no_grad():
        model[1][1].weight[0] *= 1000
        model[1][1].bias[0] *= 1000
        model[2][0].weight[:, 0] /= 1000
    return save_checkpoint(model, role="student", arch=student_ckpt.manifest["arch"], input_shape=SHAPE,
                           info={"tag": "outlier", "lineage": {}})


@pytest.mark.parametrize("fmt", ["openvino", "onnx"])
def test_accuracy_control_reverts_layers_until_the_drop_is_within_the_bound(digits, outlier_student, fmt):
    fp32 = export_checkpoint(outlier_student, fmt, digits, f"outlier-fp32-{fmt}")
    runtime = nncf_backend.BACKENDS[fmt].runtime
    qcfg = quant(onnxruntime={"per_channel": False}, nncf={"ignore_first": False},
                 accuracy_control={"max_drop": 5.0, "max_iterations": 5})
    y = digits.labels("val")
    ref_acc = (val_predictions(fp32, runtime, digits).argmax(1) == y).mean()
    plain = quantize_model(fp32, "int8", digits, qcfg, 0, f"outlier-int8-{fmt}")
    assert (val_predictions(plain, runtime, digits).argmax(1) == y).mean() < ref_acc - 0.2  # INT8 breaks it
    art = quantize_model(fp32, "int8-acc", digits, qcfg, 0, f"outlier-int8-acc-{fmt}")
    assert not art.failed, art.manifest.get("reason")
    rec = art.manifest["accuracy_control"]
    assert rec["val_accuracy_fp32"] == pytest.approx(ref_acc) and rec["max_drop_points"] == 5.0
    assert rec["drop_points"] <= 5.0 + 1e-6 and rec["runtime"] == runtime
    assert rec["layers_reverted"] == len(rec["reverted_layers"]) >= 1 and rec["within_bound"]
    # ONNX: ONNX Runtime's QDQ wrote the file (what it fuses), without the reverted layers, and held the bound
    assert rec["written_by"] == {"onnx": "onnxruntime static QDQ", "openvino": "nncf"}[fmt]
    coverage = int8_coverage(runtime, art.model_file)
    assert (coverage["int8_ops"], coverage["float_ops"]) == (rec["int8_layers"], rec["float_layers"])
    assert rec["int8_layers"] >= 1  # the layers that did not cost accuracy stay INT8 (plain INT8 lost ~80 points)
    assert rec["float_layers"] >= rec["layers_reverted"]  # and the runtime really runs the reverted ones in float
    assert (val_predictions(art, runtime, digits).argmax(1) == y).mean() == pytest.approx(rec["val_accuracy"])
    assert art.manifest["recipe"]["max_drop"] == 5.0 and "accuracy-controlled" in art.manifest["method"]


# ---------------------------------------------------------------- registry, errors, failures


def test_a_precision_defined_here_registers_and_runs(monkeypatch, digits, fp32_onnx, fp32_ir, tiny_raw):
    monkeypatch.setattr(precisions.base, "REGISTRY", dict(precisions.REGISTRY))  # leave no trace in other tests

    class RoundOptions(RecipeOptions):
        mantissa_bits: int = 3

    def round_onnx(src: Path, dst: Path, options: RoundOptions, inputs: Inputs):
        model = onnx.load(str(src))
        drop = 23 - options.mantissa_bits
        for t in model.graph.initializer:
            w = numpy_helper.to_array(t)
            if w.dtype == np.float32:
                bits = (w.view(np.uint32) >> drop) << drop
                t.CopyFrom(numpy_helper.from_array(bits.astype(np.uint32).view(np.float32), t.name))
        onnx.save(model, str(dst))
        return {"rounded_tensors": len(model.graph.initializer)}

    class RoundWeights(Precision):
        name = "round-weights"
        Options = RoundOptions
        implementations = {"onnx": round_onnx}

        def recipe(self, fmt, options, n_calibration):
            return {"mantissa_bits": options.mantissa_bits}, f"weights rounded to {options.mantissa_bits} mantissa bits"

    assert "round-weights" in precisions.names() and precisions.formats_for("round-weights") == ("onnx",)
    cfg = parse_config({**tiny_raw, "variants": {**tiny_raw["variants"], "quantization": ["fp32", "round-weights"]}})
    assert cfg.variants.quantization == ["fp32", "round-weights"]

    art = quantize_model(fp32_onnx, "round-weights", digits, QuantConfig(), 0, "student-round-weights-onnx")
    assert art.manifest["method"] == "weights rounded to 3 mantissa bits" and art.manifest["rounded_tensors"] > 0
    assert art.manifest["recipe"]["mantissa_bits"] == 3 and art.manifest["recipe"]["scheme"] == "round-weights"
    w = next(v for v in inits(graph(art)).values() if v.ndim == 4)
    assert np.all(w.view(np.uint32) & ((1 << 20) - 1) == 0)  # only 3 mantissa bits left
    assert agreement(art, fp32_onnx, "onnxruntime", digits) > 0.8
    with pytest.raises(ValueError, match="no implementation for format 'openvino'"):
        quantize_model(fp32_ir, "round-weights", digits, QuantConfig(), 0, "student-round-weights-openvino")


@pytest.mark.parametrize("path,value,field", [
    (("nncf", "ignore_frist"), True, "variants.quant.nncf.ignore_frist: unknown field"),
    (("onnxruntime", "reduce_range"), "sometimes", "variants.quant.onnxruntime.reduce_range: Input should be"),
    (("accuracy_control", "max_drop"), -1, "variants.quant.accuracy_control.max_drop: Input should be greater"),
])
def test_a_bad_option_is_a_one_line_config_error_naming_the_field(tiny_raw, path, value, field):
    section, key = path
    raw = {**tiny_raw, "variants": {**tiny_raw["variants"], "quant": {section: {key: value}}}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "tiny.yaml")
    assert str(err.value).startswith(f"tiny.yaml: {field}") and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"variants.quantization.1: unknown precision 'int4'; expected one of fp32, "):
        parse_config({**tiny_raw, "variants": {**tiny_raw["variants"], "quantization": ["fp32", "int4"]}}, "tiny.yaml")


def test_unknown_precision_fp32_identity_and_failures_recorded(digits, fp32_onnx, fp32_ir):
    with pytest.raises(ValueError, match="unknown precision 'int3'"):
        quantize_model(fp32_onnx, "int3", digits, quant(), 0, "student-int3-onnx")
    assert quantize_model(fp32_ir, "fp32", digits, quant(), 0, "student-fp32-openvino") is fp32_ir
    assert get("int8").options(quant()).nncf == NNCFOptions()  # a recipe reads only its own sections
    broken = fp32_onnx.copy_to(fp32_onnx.path.parent / f"{fp32_onnx.path.name}-broken")
    broken.model_file.write_bytes(b"not an onnx file")
    out = quantize_model(broken, "int8", digits, quant(), 0, "student-int8-onnx")
    assert out.failed and out.variant == "student-int8-onnx" and out.manifest["recipe"]["scheme"] == "int8"
    assert out.manifest["recipe"]["activation_type"] in ("uint8", "int8")  # the recipe is kept with the failure
