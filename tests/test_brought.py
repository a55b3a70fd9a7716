"""The model a user brings: any single-input image classifier in ONNX (fixed or dynamic batch, any
names, opsets 13-21, logits or probabilities), refused in one line when edgeopt cannot take it;
a brought torch checkpoint as a base for structural techniques; a technique registered from outside."""

import re
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import TensorProto, helper
from safetensors.torch import save_file
from torch import nn

from edgeopt import formats
from edgeopt.artifacts import Checkpoint
from edgeopt.models.brought import PretrainedError, inspect_onnx, load_state_dict_teacher, onnx_teacher, torch_from_onnx
from edgeopt.models.export import export_checkpoint
from edgeopt.models.zoo import build_model, load_checkpoint
from edgeopt.plan import parse_config
from edgeopt.plan.variants import variant_plan
from edgeopt.runtimes import make_predictor
from edgeopt.shrink.base import REGISTRY, Applied, Technique, TechniqueOptions
from edgeopt.shrink.prune import PruneOptions
from edgeopt.shrink.run import shrink_base
from edgeopt.train.fit import accuracy
from tests._tiny import ROOT, TINY

pytestmark = pytest.mark.slow  # trains, converts and fine-tunes models (docs/tests.md: the inner loop skips them)

SHAPE = [1, 8, 8]


def _export_legacy(model: nn.Module, path, *, opset=17, fixed_batch=True, names=("input", "logits")):
    """How most users export: the TorchScript-based exporter, often with a fixed batch of one."""
    model.eval()
    dynamic = None if fixed_batch else {names[0]: {0: "n"}, names[1]: {0: "n"}}
    torch.onnx.export(model, (torch.zeros(1, *SHAPE),), str(path), dynamo=False, opset_version=opset,
                      input_names=[names[0]], output_names=[names[1]], dynamic_axes=dynamic)
    return path


@pytest.fixture(scope="module")
def teacher_net(teacher_ckpt):
    return load_checkpoint(teacher_ckpt)


@pytest.fixture(scope="module")
def prob_onnx(teacher_net, tmp_path_factory):
    """The trained teacher with a softmax inside, fixed batch 1, opset 13, its own tensor names."""
    return _export_legacy(nn.Sequential(teacher_net, nn.Softmax(dim=1)), tmp_path_factory.mktemp("b") / "prob.onnx",
                          opset=13, names=("image", "prob"))


def _logits(net, x):
    with torch.inference_mode():
        return net(torch.from_numpy(x)).numpy()


def test_fixed_batch_probability_model_is_taken_and_detected(prob_onnx, teacher_net, digits):
    info = inspect_onnx(prob_onnx, SHAPE, 10)
    assert info.fixed_batch == 1 and info.input_name == "image" and info.opset == 13
    ckpt = onnx_teacher(prob_onnx, digits)
    assert ckpt.manifest["output"] == "probabilities" and ckpt.onnx_file is not None
    x = digits.split("val")[0][:7]  # 7 rows through a model that takes exactly one
    want = torch.softmax(torch.from_numpy(_logits(teacher_net, x)), 1).numpy()
    with torch.inference_mode():
        got = load_checkpoint(ckpt)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    for fmt in ("onnx", "openvino"):
        art = export_checkpoint(ckpt, fmt, digits, f"teacher-fp32-{fmt}")
        assert not art.failed, art.manifest.get("reason")
        assert art.manifest["output"] == "probabilities" and art.manifest["parity_max_abs_diff"] < 1e-4
        p = make_predictor(formats.get(fmt).native_runtime, art.model_file)
        assert p.fixed_batch == 1
        np.testing.assert_allclose(p.predict_batched(x), want, atol=1e-4)


@pytest.mark.parametrize("opset", [13, 21])
def test_dynamic_batch_logits_model_any_names(opset, teacher_net, digits, tmp_path):
    path = _export_legacy(teacher_net, tmp_path / "dyn.onnx", opset=opset, fixed_batch=False, names=("x", "scores"))
    ckpt = onnx_teacher(path, digits)
    assert ckpt.manifest["output"] == "logits" and ckpt.manifest["onnx"]["fixed_batch"] is None
    x = digits.split("test")[0][:32]
    np.testing.assert_allclose(make_predictor("onnxruntime", ckpt.onnx_file)(x), _logits(teacher_net, x), atol=1e-4)


def _graph(path, inputs, outputs, nodes, opset=17, domains=()):
    g = helper.make_graph(nodes, "g", inputs, outputs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def _pool_model(path, in_shape, out_shape, *, t=TensorProto.FLOAT, opset=17):
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])]
    if t != TensorProto.FLOAT:
        nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
                 helper.make_node("GlobalAveragePool", ["xf"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])]
    return _graph(path, [_vi("x", in_shape, t)], [_vi("y", out_shape)], nodes, opset=opset)


REFUSALS = {
    "two_inputs": (lambda p: _graph(p, [_vi("a", [1, 1, 8, 8]), _vi("b", [1, 1, 8, 8])], [_vi("y", [1, 1, 8, 8])],
                                    [helper.make_node("Add", ["a", "b"], ["y"])]), "2 inputs (a, b)"),
    "nhwc": (lambda p: _pool_model(p, [1, 8, 8, 1], [1, 8]), "looks channels-last (NHWC)"),
    "uint8_input": (lambda p: _pool_model(p, [1, 1, 8, 8], [1, 1], t=TensorProto.UINT8), "input 'x' is uint8"),
    "not_classes": (lambda p: _graph(p, [_vi("x", [1, 1, 8, 8])], [_vi("y", [1, 1, 1, 1])],
                                     [helper.make_node("GlobalAveragePool", ["x"], ["y"])]), "expected [N, classes]"),
    "class_count": (lambda p: _export_legacy(nn.Sequential(nn.Flatten(), nn.Linear(64, 11)), p),
                    "has 11 classes; the dataset has 10"),
    "custom_op": (lambda p: _graph(p, [_vi("x", [1, 1, 8, 8])], [_vi("y", [1, 10])],
                                   [helper.make_node("MagicClassifier", ["x"], ["y"], domain="acme.ops")],
                                   domains=("acme.ops",)), "custom operator acme.ops::MagicClassifier"),
    "old_opset": (lambda p: _pool_model(p, [1, 1, 8, 8], [1, 1], opset=11), "opset 11 is not supported"),
    "wrong_size": (lambda p: _pool_model(p, [1, 1, 16, 16], [1, 1]), "does not fit the data's images"),
    "truncated": (lambda p: p.write_bytes(b"\x08\x07\x12\x04trunc") or p, "not a valid ONNX model"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_what_edgeopt_cannot_take_is_refused_in_one_line(case, tmp_path):
    build, expect = REFUSALS[case]
    path = tmp_path / f"{case}.onnx"
    build(path)
    with pytest.raises(PretrainedError) as err:
        inspect_onnx(path, SHAPE, 10)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "\n" not in msg and expect in msg, msg


@pytest.mark.slow
def test_cli_refuses_a_bad_brought_model_before_any_work(tmp_path):
    bad = _pool_model(tmp_path / "nhwc.onnx", [1, 8, 8, 1], [1, 8])
    raw = {**TINY, "teacher": {"onnx": str(bad)}, "variants": {**TINY["variants"], "bases": ["teacher"], "shrink": {}}}
    config = tmp_path / "brought.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "run", "-c", str(config)], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"edgeopt: error: {bad}: input 'x' [1, 8, 8, 1] looks channels-last "
                                                f"(NHWC): edgeopt feeds NCHW; re-export with the channels first"]


def test_plan_gives_an_onnx_teacher_structural_variants_of_its_torch_conversion(prob_onnx):
    raw = {**TINY, "teacher": {"onnx": str(prob_onnx)},
           "variants": {**TINY["variants"], "bases": ["teacher", "student"]}}
    plan = variant_plan(parse_config(raw, "cfg"))
    names = plan.names()
    assert "teacher-int8-onnx@onnxruntime" in names and "teacher-int8-openvino@openvino" in names
    assert "student-p50-int8-onnx@onnxruntime" in names and "teacher-p50-int8-openvino@openvino" in names
    assert plan.reference_name == "teacher-fp32-onnx@onnxruntime"
    assert plan.notes == ["structural techniques (prune) shrink the teacher's torch conversion (onnx2torch), "
                          "checked against prob.onnx on validation images first"]
    assert len(names) == len(set(names))


def test_an_onnx_model_converts_to_torch_with_the_files_outputs(prob_onnx, teacher_net, digits):
    """Fixed batch 1, a softmax inside: the conversion runs 16 images at once and gives the logits."""
    converted = torch_from_onnx(prob_onnx, digits, "probabilities")
    assert converted.images == 16 and converted.max_abs_diff < 1e-5
    x = digits.split("test")[0][:40]
    with torch.inference_mode():
        np.testing.assert_allclose(converted.model(torch.from_numpy(x)).numpy(), _logits(teacher_net, x), atol=1e-4)
    assert not any(n.op_type == "Softmax" for n in onnx.load(str(converted.graph)).graph.node)


def _row_mixing_model(path):
    """A fixed-batch-1 classifier whose output adds the batch mean of its logits: one row at a time
    (ONNX Runtime) it doubles them, 16 rows at once (torch) it does not."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [64, 10], np.random.default_rng(0).normal(size=640).tolist())
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["z"]),
             helper.make_node("ReduceMean", ["z"], ["m"], axes=[0], keepdims=1), helper.make_node("Add", ["z", "m"], ["y"])]
    g = helper.make_graph(nodes, "g", [_vi("x", [1, 1, 8, 8])], [_vi("y", [1, 10])], initializer=[w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("build, expect", [
    (_row_mixing_model, r"its torch conversion differs from the file by \d\.\d\de[+-]\d\d \(> 1e-03\) in the outputs of "
                        r"16 validation images; structural recipes are refused"),
], ids=["outputs_differ"])  # a batch fixed in the graph: tests/test_onnx_exports.py
def test_a_conversion_that_does_not_match_is_refused_in_one_line(build, expect, digits, tmp_path):
    path = build(tmp_path / "model.onnx")
    with pytest.raises(PretrainedError) as err:
        torch_from_onnx(path, digits)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg and re.search(expect, msg), msg
    teacher = onnx_teacher(path, digits)  # as a base of the pipeline: its structural variants are not built
    shrunk = shrink_base(teacher, teacher, digits, "prune", 0.5, PruneOptions(amounts=[0.5]))
    assert shrunk.manifest["learned"] is False and shrunk.manifest["reason"] == msg
    art = export_checkpoint(shrunk, "onnx", digits, "teacher-p50-fp32-onnx")
    assert art.failed and f"skipped: {msg}" in art.manifest["reason"]


@pytest.mark.slow
def test_an_onnx_teacher_is_pruned_and_fine_tuned_through_the_pipeline(prob_onnx, tiny_raw, state_dir):
    """The brought fixed-batch ONNX classifier (softmax inside) is converted, checked, pruned to half
    its channels and KD fine-tuned from itself, then exported and measured against itself."""
    from edgeopt_zenml.pipelines.runner import run_pipeline

    raw = {**tiny_raw, "name": "tiny-converted",
           "teacher": {"onnx": str(prob_onnx), "optimizer": "adamw", "weight_decay": 0.0001},
           "variants": {**tiny_raw["variants"], "bases": ["teacher"], "quantization": ["fp32"], "formats": ["onnx"],
                        "runtimes": ["onnxruntime"],
                        "shrink": {"prune": {"amounts": [0.5], "finetune_steps": 100, "lr": 0.003, "round_to": None}}},
           "target": {**tiny_raw["target"], "constraints": {"max_accuracy_drop": 20.0}},
           "registry": {"name": "tiny-converted"},
           "tracking": {"uri": f"sqlite:///{state_dir / 'mlflow-converted.db'}", "experiment": "tiny-converted"},
           "deploy": {"root": str(state_dir / "deploy-converted"), "keep": 2}}
    out = run_pipeline(parse_config(raw), run_name="tiny-converted")
    ev = out["evaluation"]
    assert {r.variant for r in ev.results} == {"teacher-fp32-onnx@onnxruntime", "teacher-p50-fp32-onnx@onnxruntime"}
    assert all(r.ok for r in ev.results), [r.reason for r in ev.results if not r.ok]
    pruned = ev.result("teacher-p50-fp32-onnx@onnxruntime")
    assert pruned.lineage["base"] == "teacher" and pruned.recipe["shrink"] == "p50"
    m = pruned.metrics
    assert m["params"] < 0.3 * ev.reference.params and m["size_mb"] < 0.7 * ev.reference.size_mb, m
    assert m["accuracy"] > 0.8, m  # 10 classes: chance is 0.1; the brought model has 0.98


def test_a_brought_base_is_converted_and_calibrated_once_per_process(prob_onnx, digits, monkeypatch):
    """A run's amounts and a search's trials start from copies of one conversion (with its BatchNorms back and
    calibrated): converted once, and each build the same as from a fresh conversion."""
    from edgeopt.shrink import run

    teacher = onnx_teacher(prob_onnx, digits)
    calls = []
    monkeypatch.setattr(run, "torch_from_onnx", lambda *a, **k: calls.append(a) or torch_from_onnx(*a, **k))
    opts = PruneOptions(amounts=[0.5], round_to=None, reconstruct=True, finetune_epochs=0)  # (a fine-tune's last digits vary)

    def weights():
        ckpt = shrink_base(teacher, teacher, digits, "prune", 0.5, opts)
        return torch.load(ckpt.path / "weights.pt", weights_only=True), ckpt.manifest["macs_before"]

    run._converted.clear()
    first, second = weights(), weights()
    assert len(calls) == 1
    run._converted.clear()
    fresh = weights()
    assert len(calls) == 2 and first[1] == second[1] == fresh[1] > 0
    for other in (second, fresh):
        assert first[0].keys() == other[0].keys()
        assert all(torch.equal(first[0][k], other[0][k]) for k in first[0])


def test_batchnorm_calibration_pools_its_batches_exactly():
    """Each added BatchNorm gets its input's mean and (population) variance over all the batches together."""
    from edgeopt.models.zoo import add_batchnorm, calibrate_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
    with torch.no_grad():
        net[0].bias += 5  # a mean far from 0, where one-pass sums of squares lose the variance
    batches = [torch.randn(n, 3, 12, 12) * 2 + 1 for n in (32, 32, 7)]
    norms = add_batchnorm(net)
    calibrate_batchnorm(net, norms, batches)
    with torch.no_grad():
        out = net[0][0].double()(torch.cat(batches).double())
    mean, var = out.mean((0, 2, 3)), out.var((0, 2, 3), unbiased=False)
    assert torch.allclose(norms[0].running_mean.double(), mean, atol=1e-5)
    assert torch.allclose(norms[0].running_var.double(), var, rtol=1e-5)
    assert torch.allclose(norms[0].weight.double(), (var + norms[0].eps).sqrt(), rtol=1e-5)


def test_brought_torch_checkpoint_is_pruned_and_fine_tuned_from_itself(teacher_ckpt, digits):
    pruned = shrink_base(teacher_ckpt, teacher_ckpt, digits, "prune", 0.5,
                         PruneOptions(amounts=[0.5], finetune_epochs=2, lr=0.02, round_to=None))
    m = pruned.manifest
    assert m["base"] == "teacher" and m["lineage"]["teacher"] == teacher_ckpt.content_hash[:12]
    assert m["macs"] < 0.5 * m["macs_before"]
    x, y = digits.split("test")
    assert accuracy(load_checkpoint(pruned), x, y) > 0.85


def test_a_base_that_did_not_learn_is_skipped_not_built(student_ckpt, digits, tmp_path):
    dud = Checkpoint(shutil.copytree(student_ckpt.path, tmp_path / "dud"))
    dud = Checkpoint.write(dud.path, {**{k: v for k, v in dud.manifest.items() if k not in ("kind", "files")},
                                      "learned": False, "val_accuracy": 0.1})
    shrunk = shrink_base(dud, dud, digits, "prune", 0.5, PruneOptions(amounts=[0.5]))
    assert shrunk.manifest["learned"] is False and "weights.pt" not in shrunk.manifest["files"]
    art = export_checkpoint(dud, "onnx", digits, "student-fp32-onnx")
    assert art.failed and "did not learn" in art.manifest["reason"]


class HeadSparsity(Technique):
    """A technique defined outside edgeopt: zero the smallest classifier weights."""

    name = "headsparse"
    tag = "hs"
    role = "sparse"

    def recipe(self, amount, opts):
        return f"classifier magnitude sparsity {amount:.0%}"

    def apply(self, model, amount, opts: TechniqueOptions, ctx) -> Applied:
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            w = head.weight
            w[w.abs() <= w.abs().flatten().kthvalue(int(amount * w.numel())).values] = 0
        return {"head_zeros": float((w == 0).float().mean())}, None


def test_a_new_technique_registers_without_editing_edgeopt(student_ckpt, teacher_ckpt, digits):
    try:
        raw = {**TINY, "variants": {**TINY["variants"], "shrink": {"headsparse": {"amounts": [0.5], "finetune_epochs": 0}}}}
        cfg = parse_config(raw, "cfg")
        assert "student-hs50-int8-onnx@onnxruntime" in variant_plan(cfg).names()
        ckpt = shrink_base(student_ckpt, teacher_ckpt, digits, "headsparse", 0.5, cfg.variants.shrink["headsparse"])
        assert ckpt.manifest["head_zeros"] == pytest.approx(0.5, abs=0.02) and ckpt.manifest["tag"] == "hs50"
        assert not export_checkpoint(ckpt, "onnx", digits, "student-hs50-fp32-onnx").failed
    finally:
        REGISTRY.pop("headsparse", None)


ARCH = {"name": "small_cnn", "num_classes": 10, "in_channels": 1, "width": 8}


def test_a_safetensors_checkpoint_that_does_not_load_names_the_file(tmp_path):
    bad = tmp_path / "teacher.safetensors"
    bad.write_bytes(np.random.default_rng(0).bytes(100))
    with pytest.raises(PretrainedError) as err:
        load_state_dict_teacher(bad, ARCH, SHAPE)
    msg = str(err.value)
    assert msg.startswith(f"{bad}: not a loadable state dict (SafetensorError: ") and "\n" not in msg, msg
    torch.manual_seed(0)
    net = build_model(**{k if k != "name" else "arch": v for k, v in ARCH.items()}).eval()
    good = tmp_path / "ddp.safetensors"  # saved from a DistributedDataParallel wrapper: keys start with module.
    save_file({f"module.{k}": v.contiguous() for k, v in net.state_dict().items()}, str(good))
    x = torch.randn(3, *SHAPE)
    with torch.inference_mode():
        torch.testing.assert_close(load_state_dict_teacher(good, ARCH, SHAPE)(x), net(x))


def test_an_onnx_teacher_with_external_data_is_copied_with_its_data(teacher_net, digits, tmp_path):
    folder = tmp_path / "user"
    folder.mkdir()
    path = _export_legacy(teacher_net, folder / "teacher.onnx")
    onnx.save(onnx.load(str(path)), str(path), save_as_external_data=True, location="teacher.data", size_threshold=0)
    assert (folder / "teacher.data").stat().st_size > path.stat().st_size
    ckpt = onnx_teacher(path, digits)
    shutil.rmtree(folder)  # the copy must not need the user's folder any more
    assert set(ckpt.manifest["files"]) == {"model.onnx"}
    x = digits.split("test")[0][:8]
    np.testing.assert_allclose(make_predictor("onnxruntime", ckpt.onnx_file).predict_batched(x),
                               _logits(teacher_net, x), atol=1e-4)


def test_what_onnx_runtime_cannot_load_is_refused_in_one_line(digits, tmp_path):
    """The checker passes (it does not infer shapes); ONNX Runtime refuses to create the session."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [32, 10], [0.0] * 320)  # 32 inputs; a flattened image has 64
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])]
    g = helper.make_graph(nodes, "g", [_vi("x", [1, 1, 8, 8])], [_vi("y", [1, 10])], initializer=[w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "mismatch.onnx"
    onnx.save(m, str(path))
    inspect_onnx(path, SHAPE, 10)
    for call, what in ((lambda: onnx_teacher(path, digits), "run it"),
                       (lambda: torch_from_onnx(path, digits), "optimize it for the torch conversion")):
        with pytest.raises(PretrainedError) as err:
            call()
        msg = str(err.value)
        assert msg.startswith(f"{path}: ONNX Runtime cannot {what} (Fail: ") and "\n" not in msg, msg
        assert "Op (MatMul) [ShapeInferenceError]" in msg
