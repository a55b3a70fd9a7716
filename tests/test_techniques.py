"""Every compression technique on small data, each asserting its real effect on the model."""

import numpy as np
import onnx
import openvino as ov
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgeopt.config import LowRankConfig, PruneConfig, QuantConfig, SparsityConfig
from edgeopt.export import export_checkpoint
from edgeopt.lowrank import apply_lowrank_plan, energy_rank, factorize_lowrank
from edgeopt.models import count_macs_params, load_checkpoint, save_checkpoint
from edgeopt.pruning import IMPORTANCES, output_layers, prune_channels, shrink_student, sparsify
from edgeopt.quantization import quantize_model
from edgeopt.runtimes import make_predictor
from edgeopt.training import accuracy

SHAPE, CLASSES = [1, 8, 8], 10


def conv_channels(model):
    return [c.out_channels for c in model.modules() if isinstance(c, nn.Conv2d)]


# ---------------------------------------------------------------- structured pruning


@pytest.mark.parametrize("importance", [i for i in IMPORTANCES if i != "taylor"])
def test_every_importance_halves_each_layer_locally_and_ranks_globally(student_ckpt, importance):
    torch.manual_seed(0)  # "random" importance draws from torch's generator
    local = prune_channels(load_checkpoint(student_ckpt), SHAPE, CLASSES, 0.5, importance)
    assert conv_channels(local) == [c // 2 for c in conv_channels(load_checkpoint(student_ckpt))]
    glob = prune_channels(load_checkpoint(student_ckpt), SHAPE, CLASSES, 0.5, importance, global_pruning=True)
    assert conv_channels(glob) != conv_channels(local)  # one ranking across layers: uneven widths
    assert abs(sum(conv_channels(glob)) - sum(conv_channels(local))) <= 2
    steps = prune_channels(load_checkpoint(student_ckpt), SHAPE, CLASSES, 0.5, importance, iterative_steps=3)
    assert conv_channels(steps) == conv_channels(local)  # the ratio is reached over the steps


def test_taylor_pruning_uses_gradients_then_kd_finetune_recovers(digits, teacher_ckpt, student_ckpt):
    with pytest.raises(ValueError, match="gradient_batches"):
        prune_channels(load_checkpoint(student_ckpt), SHAPE, CLASSES, 0.5, "taylor")
    cfg = dict(importance="taylor", iterative_steps=2, lr=0.02)
    raw = shrink_student(student_ckpt, teacher_ckpt, digits, "prune", 0.5, PruneConfig(finetune_epochs=0, **cfg))
    tuned = shrink_student(student_ckpt, teacher_ckpt, digits, "prune", 0.5, PruneConfig(finetune_epochs=1, **cfg))
    m = tuned.manifest
    assert m["tag"] == "p50" and m["shrink"] == {"method": "prune", "amount": 0.5} and m["role"] == "pruned"
    assert m["importance"] == "taylor" and m["iterative_steps"] == 2 and m["finetune_epochs"] == 1
    assert m["macs"] < 0.5 * m["macs_before"] and m["params"] < 0.5 * m["params_before"]
    assert m["lineage"]["student"] == student_ckpt.content_hash[:12]
    x, y = digits.split("test")
    assert accuracy(load_checkpoint(tuned), x, y) > accuracy(load_checkpoint(raw), x, y) + 0.05
    assert shrink_student(student_ckpt, teacher_ckpt, digits, "prune", 0.0, PruneConfig()) is student_ckpt
    with pytest.raises(ValueError, match="shrink method"):
        shrink_student(student_ckpt, teacher_ckpt, digits, "distill", 0.5, PruneConfig())


# ---------------------------------------------------------------- low-rank factorization


def near_low_rank_net(rank: int = 4, seed: int = 0) -> nn.Module:
    """Layers whose weights are rank ``rank`` plus 1 % noise: the decaying spectrum of trained layers."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, CLASSES),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                out, cols = m.weight.shape[0], m.weight[0].numel()
                w = torch.randn(out, rank, generator=g) @ torch.randn(rank, cols, generator=g) / (rank * cols) ** 0.5
                m.weight.copy_((w + 0.01 * torch.randn(out, cols, generator=g) / cols**0.5).reshape(m.weight.shape))
    return net.eval()


def test_lowrank_keeps_the_energy_with_the_planned_ranks():
    assert [energy_rank(torch.tensor([3.0, 2.0, 1.0]), e) for e in (0.5, 0.9, 0.95)] == [1, 2, 3]
    net, x = near_low_rank_net(), torch.randn(16, 3, 8, 8)
    ref, params_before = net(x), sum(p.numel() for p in net.parameters())
    plan = factorize_lowrank(net, 0.99, min_params_saved=0.1, exclude=output_layers(net, CLASSES))
    assert plan == {"0": 4, "2": 4, "4": 4, "7": 4}  # the classifier "9" is never factorized
    for name, rank in plan.items():
        first, second = net.get_submodule(name)
        assert first.weight.shape[0] == rank and second.weight.shape[1] == rank and first.bias is None
    assert isinstance(net[4][0], nn.Conv2d) and net[4][0].stride == (2, 2) and net[4][1].kernel_size == (1, 1)
    assert sum(p.numel() for p in net.parameters()) < 0.4 * params_before
    with torch.no_grad():
        out = net(x)
        assert float((out - ref).abs().max() / ref.abs().max()) < 0.05  # before any fine-tune
        rebuilt = apply_lowrank_plan(near_low_rank_net(seed=1), plan)
        rebuilt.load_state_dict(net.state_dict(), strict=True)
        assert torch.equal(rebuilt(x), out)


def test_lowrank_skips_layers_that_would_not_shrink_and_rejects_bad_energy(student_ckpt):
    model = load_checkpoint(student_ckpt)
    assert factorize_lowrank(model, 0.99, 0.1, exclude=output_layers(model, CLASSES)) == {}  # full rank needed
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="energy"):
            factorize_lowrank(model, bad)


def test_lowrank_student_round_trips_through_its_checkpoint(digits, teacher_ckpt, student_ckpt):
    ckpt = shrink_student(student_ckpt, teacher_ckpt, digits, "lowrank", 0.9,
                          LowRankConfig(finetune_epochs=1, lr=0.02, min_params_saved=0.05))
    m = ckpt.manifest
    assert m["tag"] == "lr90" and m["role"] == "lowrank" and m["lowrank_plan"] and "5" not in m["lowrank_plan"]
    model = load_checkpoint(ckpt)
    for name, rank in m["lowrank_plan"].items():
        first, second = model.get_submodule(name)
        assert first.weight.shape[0] == rank and second.weight.shape[1] == rank
    assert m["params"] < m["params_before"] and count_macs_params(model, SHAPE)[1] == m["params"]
    x, y = digits.split("test")
    assert accuracy(model, x, y) > 0.8
    onnx_art = export_checkpoint(ckpt, "onnx", digits)  # the factorized model exports with parity
    assert not onnx_art.failed and onnx_art.variant == "lr90-fp32-onnx"


# ---------------------------------------------------------------- unstructured sparsity


def test_sparsity_survives_the_finetune_and_compresses(digits, teacher_ckpt, student_ckpt):
    ckpt = shrink_student(student_ckpt, teacher_ckpt, digits, "sparsity", 0.6,
                          SparsityConfig(finetune_epochs=1, lr=0.02))
    model, report = load_checkpoint(ckpt), ckpt.manifest["sparsity"]
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    measured = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert measured == pytest.approx(0.6, abs=0.005) and report["overall"] == pytest.approx(measured)
    assert ckpt.manifest["tag"] == "sp60" and set(report["layers"]) == {"0.0", "1.0", "2.0", "5"}
    assert report["zlib_bytes_sparse"] < 0.8 * report["zlib_bytes_dense"] and report["zlib_saving"] > 0.2
    x, y = digits.split("test")
    assert accuracy(model, x, y) > 0.8
    with pytest.raises(ValueError, match="sparsity"):
        sparsify(load_checkpoint(student_ckpt), 1.0)


def test_per_layer_sparsity_hits_every_layer(student_ckpt):
    model = load_checkpoint(student_ckpt)
    for m, name in sparsify(model, 0.5, global_pruning=False):
        assert float((getattr(m, name) == 0).float().mean()) == pytest.approx(0.5, abs=0.06)


# ---------------------------------------------------------------- quantization


@pytest.fixture(scope="module")
def fp32_onnx(digits, student_ckpt):
    return export_checkpoint(student_ckpt, "onnx", digits)


@pytest.fixture(scope="module")
def fp32_ir(digits, student_ckpt):
    return export_checkpoint(student_ckpt, "openvino", digits)


def graph(art):
    return onnx.load(str(art.model_file)).graph


def inits(g):
    return {t.name: numpy_helper.to_array(t) for t in g.initializer}


def consumer_inputs(g, op_type):
    return [n.input for n in g.node if n.op_type == op_type]


def val_predictions(art, runtime, digits):
    return make_predictor(runtime, art.model_file).predict_batched(digits.split("val")[0])


def test_int8_static_s8s8_per_channel_vs_u8s8_per_tensor_reduce_range(digits, fp32_onnx):
    s8 = quantize_model(fp32_onnx, "int8", digits, QuantConfig(calibration_samples=32))
    u8 = quantize_model(fp32_onnx, "int8", digits, QuantConfig(calibration_samples=32, onnxruntime={
        "activation_type": "uint8", "per_channel": False, "reduce_range": True}))
    assert s8.variant == "p0-int8-onnx" and s8.manifest["lineage"]["parent"] == fp32_onnx.variant
    assert "S8S8 per-channel minmax" in s8.manifest["method"] and "U8S8 minmax reduce-range" in u8.manifest["method"]
    assert u8.manifest["recipe"]["activation_type"] == "uint8" and u8.manifest["recipe"]["reduce_range"] is True
    for art, act_dtype, per_channel in ((s8, np.int8, True), (u8, np.uint8, False)):
        g, values = graph(art), inits(graph(art))
        assert any(v.dtype == np.int8 and v.ndim >= 2 for v in values.values())  # INT8 weights
        act_zero_points = [values[i[2]] for i in consumer_inputs(g, "QuantizeLinear")]
        assert act_zero_points and all(zp.dtype == act_dtype for zp in act_zero_points)
        weight_dq = [i for i in consumer_inputs(g, "DequantizeLinear") if values.get(i[0], np.zeros(0)).ndim == 4]
        out_channels = [values[i[0]].shape[0] for i in weight_dq]
        assert [values[i[1]].size for i in weight_dq] == (out_channels if per_channel else [1] * len(weight_dq))
    widest = lambda a: max(int(np.abs(v.astype(np.int32)).max()) for v in inits(graph(a)).values()  # noqa: E731
                           if v.dtype == np.int8 and v.ndim >= 2)
    assert widest(s8) == 127 and widest(u8) <= 64  # reduce_range: 7-bit weights
    ref = val_predictions(fp32_onnx, "onnxruntime", digits).argmax(1)
    for art in (s8, u8):
        assert (val_predictions(art, "onnxruntime", digits).argmax(1) == ref).mean() > 0.9


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibrations_run(digits, fp32_onnx, method):
    minmax = quantize_model(fp32_onnx, "int8", digits, QuantConfig(calibration_samples=32))
    art = quantize_model(fp32_onnx, "int8", digits, QuantConfig(calibration_samples=32,
                                                                onnxruntime={"calibrate_method": method}))
    assert not art.failed and art.manifest["recipe"]["calibrate_method"] == method
    scales = lambda a: {k: float(v) for k, v in inits(graph(a)).items()  # noqa: E731 - activation scales
                        if k.endswith("_scale") and v.size == 1}
    assert scales(art) != scales(minmax)  # another calibration gives other activation ranges
    ref = val_predictions(fp32_onnx, "onnxruntime", digits).argmax(1)
    assert (val_predictions(art, "onnxruntime", digits).argmax(1) == ref).mean() > 0.9


def test_dynamic_int8_quantizes_at_run_time_and_is_onnx_only(digits, fp32_onnx, fp32_ir):
    art = quantize_model(fp32_onnx, "int8-dynamic", digits, QuantConfig())
    ops = {n.op_type for n in graph(art).node}
    assert "DynamicQuantizeLinear" in ops and ops & {"MatMulInteger", "ConvInteger"}
    assert art.variant == "p0-int8-dynamic-onnx" and art.manifest["recipe"]["weight_type"] == "int8"
    ref = val_predictions(fp32_onnx, "onnxruntime", digits).argmax(1)
    assert (val_predictions(art, "onnxruntime", digits).argmax(1) == ref).mean() > 0.9
    with pytest.raises(ValueError, match="int8-dynamic is an ONNX Runtime technique"):
        quantize_model(fp32_ir, "int8-dynamic", digits, QuantConfig())


def float_bytes(g):
    return sum(v.nbytes for v in inits(g).values() if v.dtype.kind == "f")


def test_fp16_halves_weights_and_keeps_accuracy(digits, fp32_onnx, fp32_ir):
    half = quantize_model(fp32_onnx, "fp16", digits, QuantConfig())
    g = graph(half)
    assert float_bytes(g) < 0.55 * float_bytes(graph(fp32_onnx))
    assert {t.type.tensor_type.elem_type for t in (*g.input, *g.output)} == {onnx.TensorProto.FLOAT}
    ir_half = quantize_model(fp32_ir, "fp16", digits, QuantConfig())
    bin_bytes = lambda a: a.manifest["files"]["model.bin"]["bytes"]  # noqa: E731
    assert bin_bytes(ir_half) < 0.55 * bin_bytes(fp32_ir) and ir_half.variant == "p0-fp16-openvino"
    ref = val_predictions(fp32_onnx, "onnxruntime", digits)
    for art, runtime in ((half, "onnxruntime"), (half, "openvino"), (ir_half, "openvino")):
        out = val_predictions(art, runtime, digits)
        assert np.abs(out - ref).max() < 0.05 and (out.argmax(1) == ref.argmax(1)).mean() > 0.99


@pytest.mark.parametrize("preset", ["performance", "mixed"])
def test_nncf_presets(digits, fp32_ir, preset):
    art = quantize_model(fp32_ir, "int8", digits, QuantConfig(calibration_samples=32, nncf={"preset": preset}))
    assert art.manifest["recipe"]["subset_size"] == 32  # capped by the calibration set (default 300)
    fq = [op for op in ov.Core().read_model(str(art.model_file)).get_ordered_ops()
          if op.get_type_name() == "FakeQuantize"]
    low, high = (float(fq[0].input_value(i).get_node().get_data().ravel()[0]) for i in (1, 2))  # the input's
    assert (low == pytest.approx(-high, rel=0.02)) == (preset == "performance")  # mixed: asymmetric activations
    ref = val_predictions(fp32_ir, "openvino", digits).argmax(1)
    assert (val_predictions(art, "openvino", digits).argmax(1) == ref).mean() > 0.9


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
def test_accuracy_control_keeps_the_drop_within_the_bound(digits, outlier_student, fmt):
    fp32 = export_checkpoint(outlier_student, fmt, digits)
    runtime = "onnxruntime" if fmt == "onnx" else "openvino"
    qcfg = QuantConfig(calibration_samples=32, onnxruntime={"per_channel": False},
                       accuracy_control={"max_drop": 1.0, "max_iterations": 5})
    y = digits.split("val")[1]
    ref_acc = (val_predictions(fp32, runtime, digits).argmax(1) == y).mean()
    plain = quantize_model(fp32, "int8", digits, qcfg)
    assert (val_predictions(plain, runtime, digits).argmax(1) == y).mean() < ref_acc - 0.2  # INT8 breaks it
    art = quantize_model(fp32, "int8-acc", digits, qcfg)
    rec = art.manifest["accuracy_control"]
    assert not art.failed and art.variant == f"outlier-int8-acc-{fmt}"
    assert rec["val_accuracy_fp32"] == pytest.approx(ref_acc) and rec["max_drop_points"] == 1.0
    assert rec["val_accuracy_fp32"] - rec["val_accuracy"] <= 0.01 + 1e-9
    assert (val_predictions(art, runtime, digits).argmax(1) == y).mean() == pytest.approx(rec["val_accuracy"])
    assert art.manifest["recipe"]["max_drop"] == 1.0 and art.manifest["recipe"]["max_iterations"] == 5
    assert "accuracy-controlled" in art.manifest["method"]


def test_bad_schemes_are_rejected_and_failures_recorded(digits, fp32_onnx, fp32_ir):
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
        quantize_model(fp32_onnx, "int3", digits, QuantConfig())
    assert quantize_model(fp32_ir, "fp32", digits, QuantConfig()) is fp32_ir
    broken = fp32_onnx.copy_to(fp32_onnx.path.parent / f"{fp32_onnx.path.name}-broken")
    broken.model_file.write_bytes(b"not an onnx file")
    out = quantize_model(broken, "int8", digits, QuantConfig(calibration_samples=32))
    assert out.failed and out.variant == "p0-int8-onnx" and out.manifest["recipe"]["scheme"] == "int8"
