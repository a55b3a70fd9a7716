"""Every ordinary export of an image classifier becomes a torch model that trains, prunes and exports again.

Exported the ways users export (batch 1 baked into ``view(1, -1)`` or ``view(x.size(0), -1)``,
``torch.flatten``, ``nn.Flatten``, a ``mean([2, 3])`` or adaptive pool, Gemm and MatMul+Add heads, a
squeeze-excitation written with ``view(n, c, 1, 1)``, TF-style "same" padding computed from the input's shape
at run time, logits or a softmax; the TorchScript and the dynamo exporters at opsets 13 to 21; a batch of 1,
of 2 or dynamic), each file is converted and checked against itself, fine-tuned for two steps at batch 8,
pruned by the project's prune technique and exported again. What cannot be converted is
refused with the node and its operator named, before any fine-tune.
"""

import contextlib
import io
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from edgeopt.models.brought import PretrainedError, inspect_onnx, onnx_teacher, torch_from_onnx
from edgeopt.models.export import export_checkpoint, export_onnx
from edgeopt.shrink.base import REGISTRY, ShrinkContext, Technique, get
from edgeopt.shrink.run import shrink_base

SHAPE = [1, 8, 8]  # the digits' images
CLASSES = 10


class Classifier(nn.Module):
    """Two convolutions, a pool (or none), a flatten written one of the ways users write it, a head."""

    def __init__(self, flatten: str, pool: str = "", same: bool = False, head: str = "linear", softmax: bool = False,
                 se: bool = False):
        super().__init__()
        self.flatten, self.pool, self.same, self.head, self.softmax = flatten, pool, same, head, softmax
        self.c1 = nn.Conv2d(1, 8, 3, 1, 0 if same else 1)
        self.c2 = nn.Conv2d(8, 16, 3, 2, 0 if same else 1)
        self.se = nn.Linear(16, 16) if se else None  # squeeze-excitation written with a Linear and view(n, c, 1, 1)
        features = 16 if pool else 16 * 4 * 4
        if head == "matmul":  # a head written by hand: x @ w + b exports as MatMul + Add
            self.w = nn.Parameter(torch.randn(features, CLASSES) * 0.1)
            self.b = nn.Parameter(torch.zeros(CLASSES))
        else:
            self.fc = nn.Linear(features, CLASSES)
        self.nn_flatten = nn.Flatten()

    @staticmethod
    def pad_same(x, k: int, stride: int):
        """TensorFlow's "same" padding, computed from the input's shape at run time."""
        ih, iw = x.shape[-2:]
        ph = max((-(-ih // stride) - 1) * stride + k - ih, 0)
        pw = max((-(-iw // stride) - 1) * stride + k - iw, 0)
        return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])

    def forward(self, x):
        x = torch.relu(self.c1(self.pad_same(x, 3, 1) if self.same else x))
        x = torch.relu(self.c2(self.pad_same(x, 3, 2) if self.same else x))
        if self.se is not None:
            x = x * torch.sigmoid(self.se(x.mean([2, 3]))).view(x.size(0), -1, 1, 1)
        if self.pool == "mean":
            x = x.mean([2, 3], keepdim=True)
        elif self.pool == "adaptive":
            x = F.adaptive_avg_pool2d(x, 1)
        x = {"view(1, -1)": lambda: x.view(1, -1), "view(x.size(0), -1)": lambda: x.view(x.size(0), -1),
             "torch.flatten": lambda: torch.flatten(x, 1), "nn.Flatten": lambda: self.nn_flatten(x)}[self.flatten]()
        y = x @ self.w + self.b if self.head == "matmul" else self.fc(x)
        return torch.softmax(y, 1) if self.softmax else y


def export(net: nn.Module, path, exporter: str, opset: int, batch=1):
    """At a fixed batch (1 as most users do; None: a dynamic one); the dynamo exporter prints its
    progress, which the test does not need."""
    dynamic = None
    if batch is None:
        dynamic = {"pixels": {0: "n"}, "scores": {0: "n"}} if exporter == "torchscript" else \
            {"x": {0: torch.export.Dim("n", min=1, max=64)}}
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(net.eval(), (torch.zeros(batch or 2, *SHAPE),), str(path), dynamo=exporter == "dynamo",
                          opset_version=opset, input_names=["pixels"], output_names=["scores"],
                          **({"dynamic_axes": dynamic} if exporter == "torchscript" else {"dynamic_shapes": dynamic}))
    return path


# id: (Classifier arguments, exporter, opset[, batch]). The dynamo exporter writes opset 18 or later (asked
# for 13 or 17, it keeps 18: its ReduceMean does not convert down), so it is tried at 18 and 21.
CASES = {
    "torchscript17-dynamic-viewN-same": (dict(flatten="view(x.size(0), -1)", same=True), "torchscript", 17, None),
    "dynamo18-batch2-viewN-mean-matmul": (dict(flatten="view(x.size(0), -1)", pool="mean", head="matmul"), "dynamo",
                                          18, 2),
    "torchscript13-view1-mean-gemm-se": (dict(flatten="view(1, -1)", pool="mean", se=True), "torchscript", 13),
    "torchscript17-viewN-same-adaptive-softmax": (
        dict(flatten="view(x.size(0), -1)", pool="adaptive", same=True, softmax=True), "torchscript", 17),
    "torchscript18-flatten-mean-matmul-softmax": (
        dict(flatten="torch.flatten", pool="mean", head="matmul", softmax=True), "torchscript", 18),
    "torchscript21-nnflatten-same-gemm": (dict(flatten="nn.Flatten", same=True), "torchscript", 21),
    "dynamo18-view1-mean-softmax": (dict(flatten="view(1, -1)", pool="mean", softmax=True), "dynamo", 18),
    "dynamo18-viewN-same-matmul": (dict(flatten="view(x.size(0), -1)", same=True, head="matmul"), "dynamo", 18),
    "dynamo21-flatten-adaptive-gemm-se": (dict(flatten="torch.flatten", pool="adaptive", se=True), "dynamo", 21),
    "dynamo21-nnflatten-same-mean-matmul-softmax": (
        dict(flatten="nn.Flatten", pool="mean", same=True, head="matmul", softmax=True), "dynamo", 21),
}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_ordinary_export_converts_trains_prunes_and_exports_again(case, digits, tmp_path):
    kwargs, exporter, opset, batch = (*CASES[case], 1)[:4]
    torch.manual_seed(0)
    net = Classifier(**kwargs).eval()
    path = export(net, tmp_path / "model.onnx", exporter, opset, batch)
    info = inspect_onnx(path, SHAPE, CLASSES)
    assert info.fixed_batch == batch and info.opset == opset

    converted = torch_from_onnx(path, digits, "probabilities" if kwargs.get("softmax") else "logits")
    assert converted.max_abs_diff < 1e-4  # against the file, at batch 1 and at batch 16
    model = converted.model
    x = torch.from_numpy(digits.split("val")[0][:16])
    with torch.inference_mode():
        want = net(x[:1]) if kwargs["flatten"] == "view(1, -1)" else net(x)  # view(1, -1) runs batch 1 only
        got = model(x)
        got = torch.softmax(got, 1) if kwargs.get("softmax") else got
    torch.testing.assert_close(got[:len(want)], want, atol=1e-4, rtol=0)

    model.train()  # a fine-tune at batch 8: every trainable tensor moves
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        loss = F.cross_entropy(model(torch.randn(8, *SHAPE)), torch.randint(0, CLASSES, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss) and all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert any(isinstance(m, nn.Linear) for m in model.modules())  # the head is a layer pruning can shrink

    prune = get("prune")
    ctx = ShrinkContext(dataset=digits, input_shape=SHAPE, num_classes=CLASSES, seed=0, load_base=lambda: None)
    params = _params(model)
    prune.apply(model, 0.5, prune.Options(amounts=[0.5], round_to=None), ctx)
    assert _params(model) < 0.5 * params

    exported = export_onnx(model, SHAPE, tmp_path / "pruned.onnx")
    x5 = np.ascontiguousarray(x[:5].numpy())
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        np.testing.assert_allclose(session.run(None, {"input": x5})[0], model.eval()(x[:5]).numpy(), atol=1e-4)


def test_the_issues_batch_one_reshape_converts_and_runs_any_batch(digits, tmp_path):
    """A hand-made graph whose Reshape before a MatMul classifier says [1, 64]: batch 1 only, until the
    conversion copies the batch instead."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [64, CLASSES], np.random.default_rng(0).normal(size=640).tolist())
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 64])
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "w"], ["y"], name="classifier")]
    path = _save(tmp_path / "reshape.onnx", nodes, [w, shape])
    converted = torch_from_onnx(path, digits)
    assert converted.max_abs_diff < 1e-4
    ops = [n.op_type for n in onnx.load(str(converted.graph)).graph.node]
    assert ops == ["Flatten", "Gemm"], ops
    assert [type(m) for m in converted.model.modules()].count(nn.Linear) == 1


def _save(path, nodes, initializers, opset=17, out_shape=(1, CLASSES)):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *SHAPE])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
                          initializer=initializers)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def _shrink(path):
    """A Shrink activation (what a Hardshrink is in ONNX): onnx2torch has no converter for it."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [64, CLASSES], [0.01] * 640)
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flatten"),
             helper.make_node("Shrink", ["f"], ["s"], name="hardshrink", lambd=0.5),
             helper.make_node("MatMul", ["s", "w"], ["y"], name="classifier")]
    return _save(path, nodes, [w])


def _batch_one_concat(path):
    """A constant of batch 1 concatenated to the features: no shape constant to rewrite, batch 1 only."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [68, CLASSES], np.random.default_rng(0).normal(size=680).tolist())
    extra = helper.make_tensor("extra", TensorProto.FLOAT, [1, 4], [0.5] * 4)
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flatten"),
             helper.make_node("Concat", ["f", "extra"], ["c"], name="append_extra", axis=1),
             helper.make_node("MatMul", ["c", "w"], ["y"], name="classifier")]
    return _save(path, nodes, [w, extra])


def _gelu_opset20(path):
    """Gelu came in opset 20; onnx2torch stops at 17."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [64, CLASSES], [0.01] * 640)
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flatten"), helper.make_node("Gelu", ["f"], ["g"], name="act"),
             helper.make_node("MatMul", ["g", "w"], ["y"], name="classifier")]
    return _save(path, nodes, [w], opset=20)


UNCONVERTIBLE = {
    "no_converter": (_shrink, r"onnx2torch cannot convert node 'hardshrink' \(Shrink\) \(NotImplementedError: "),
    "batch_fixed_in_a_constant": (_batch_one_concat, r"its torch conversion cannot run a batch of 16 images at node "
                                                     r"'append_extra' \(Concat\) \(RuntimeError: "),
    "operator_after_opset_17": (_gelu_opset20, r"cannot be made convertible: node 'act' \(Gelu\): the operator came "
                                               r"after opset 17"),
}


@pytest.mark.parametrize("case", sorted(UNCONVERTIBLE))
def test_what_cannot_be_converted_names_the_node_and_its_operator(case, digits, tmp_path):
    build, expect = UNCONVERTIBLE[case]
    path = build(tmp_path / f"{case}.onnx")
    with pytest.raises(PretrainedError) as err:
        torch_from_onnx(path, digits)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg and re.search(expect, msg), msg


def test_a_refused_conversion_fails_the_bases_variants_before_any_fine_tune(digits, tmp_path, monkeypatch):
    path = _shrink(tmp_path / "shrink.onnx")
    monkeypatch.setattr("edgeopt.shrink.run.fit", _no_fit)
    teacher = onnx_teacher(path, digits)
    shrunk = shrink_base(teacher, teacher, digits, "prune", 0.5, get("prune").Options(amounts=[0.5]))
    assert shrunk.manifest["learned"] is False and "(Shrink)" in shrunk.manifest["reason"]


def _no_fit(*args, **kwargs):
    raise AssertionError("a fine-tune started")


class _ShapeFromTensor(nn.Module):
    """Reads a shape from a tensor, as onnx2torch's ConstantOfShape does: runs eagerly, does not export."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shape", torch.tensor([1, CLASSES]))

    def forward(self, x):
        return x + torch.zeros(torch.Size(self.shape))


class ShapeFromTensor(Technique):
    name, tag, role = "shapefromtensor", "sft", "changed"

    def recipe(self, amount, opts):
        return "a change that does not export"

    def apply(self, model, amount, opts, ctx):
        name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        model.set_submodule(name, nn.Sequential(head, _ShapeFromTensor()))
        return {}, None


def test_a_changed_model_that_does_not_export_fails_before_its_fine_tune(digits, tmp_path, monkeypatch):
    path = export(Classifier("view(1, -1)", pool="mean"), tmp_path / "model.onnx", "torchscript", 17)
    monkeypatch.setattr("edgeopt.shrink.run.fit", _no_fit)
    teacher = onnx_teacher(path, digits)
    try:
        opts = get("shapefromtensor").Options(amounts=[0.5], finetune_steps=2)
        shrunk = shrink_base(teacher, teacher, digits, "shapefromtensor", 0.5, opts)
    finally:
        REGISTRY.pop("shapefromtensor", None)
    reason = shrunk.manifest["reason"]
    assert shrunk.manifest["learned"] is False and "\n" not in reason, reason
    assert reason == ("the changed model does not export to ONNX (TorchExportError: TypeError: torch.Size() takes an "
                      "iterable of 'int' (item 0 is 'FakeTensor') at node 'fc/Gemm'); found before its fine-tune"), reason


@pytest.mark.slow
def test_a_same_padded_batch_one_softmax_file_is_pruned_fine_tuned_and_exported(digits, tmp_path):
    """The issue's user file in small: batch 1, "same" padding computed from shapes, a softmax inside;
    through the pipeline's own shrink (prune, KD fine-tune) and export."""
    torch.manual_seed(0)
    path = export(Classifier("view(x.size(0), -1)", same=True, softmax=True), tmp_path / "user.onnx", "torchscript",
                  17)
    teacher = onnx_teacher(path, digits)
    opts = get("prune").Options(amounts=[0.5], finetune_steps=3, round_to=None)
    shrunk = shrink_base(teacher, teacher, digits, "prune", 0.5, opts)
    m = shrunk.manifest
    assert m.get("learned", True), m.get("reason")
    assert m["conversion"]["max_abs_diff"] < 1e-4 and m["params"] < 0.5 * teacher.manifest["params"]
    art = export_checkpoint(shrunk, "onnx", digits, "teacher-p50-fp32-onnx")
    assert not art.failed, art.manifest.get("reason")
    assert art.manifest["parity_max_abs_diff"] < 1e-4
