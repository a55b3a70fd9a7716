"""int8-qat: quantization-aware training where post-training quantization costs too much, measured against
the project's PTQ (int8) of the same FP32 file in the same test, on both formats and their own runtimes.

The test net is MobileNetV3-like (depthwise convolutions, squeeze-excitation, ReLU in the early blocks and
hard-swish after, as MobileNetV3's are). Trained on digits alone, INT8 PTQ costs it 0 to 2 val images of
270: less than the split's noise, so no test could tell PTQ from QAT on it. What makes real MobileNets and
EfficientNets lose points under per-tensor activation quantization is the spread of the channels' ranges
(Nagel et al. 2019, "Data-Free Quantization", section 3); :meth:`Block.spread_ranges` gives the trained net
that spread explicitly, as a function-preserving rescaling (the FP32 outputs are unchanged to 1e-5), so
PTQ's loss is the real mechanism and no luck of a seed.
"""

import shutil

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from edgeopt import formats
from edgeopt.artifacts import ModelArtifact, new_workdir
from edgeopt.config import ConfigError, FitConfig, QuantConfig
from edgeopt.formats.openvino import SOURCE as ONNX_SOURCE
from edgeopt.measure.latency import measure_models
from edgeopt.models.brought import onnx_teacher
from edgeopt.models.export import export_checkpoint, export_onnx
from edgeopt.plan import parse_config
from edgeopt.precisions import formats_for, get, quantize_model
from edgeopt.runtimes import make_predictor
from edgeopt.runtimes.coverage import int8_coverage
from edgeopt.train.fit import fit
from tests.test_onnx_exports import _shrink
from tests.test_validation_split import test_split_gone  # noqa: F401  (the fixture: digits without a test split)

SPREAD = 32.0  # the channels' ranges differ by up to this factor either way


class SE(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(4, c // 4), 1), nn.Conv2d(max(4, c // 4), c, 1)

    def forward(self, x):
        return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class Block(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, squeeze-excitation, 1x1 project."""

    def __init__(self, cin: int, cexp: int, cout: int, stride: int, act: type[nn.Module]):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(cin, cexp, 1, bias=False), nn.BatchNorm2d(cexp), act())
        self.dw = nn.Sequential(nn.Conv2d(cexp, cexp, 3, stride, 1, groups=cexp, bias=False), nn.BatchNorm2d(cexp), act())
        self.se = SE(cexp)
        self.project = nn.Sequential(nn.Conv2d(cexp, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y

    @torch.no_grad()
    def spread_ranges(self, scale: torch.Tensor) -> None:
        """Channel c of the expansion scaled by scale[c] (ReLU and the depthwise conv carry it through),
        undone where it is read: SE's first layer and the projection. BatchNorm folded first."""
        e, d = fuse_conv_bn_eval(*self.expand[:2]), fuse_conv_bn_eval(*self.dw[:2])
        e.weight.mul_(scale[:, None, None, None])
        e.bias.mul_(scale)
        d.bias.mul_(scale)
        self.expand, self.dw = nn.Sequential(e, nn.ReLU()), nn.Sequential(d, nn.ReLU())
        self.se.fc1.weight.div_(scale[None, :, None, None])
        self.project[0].weight.div_(scale[None, :, None, None])


def mobile_net(width: int = 8, classes: int = 10) -> nn.Sequential:
    w = width
    return nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.Hardswish(),
                         Block(w, 3 * w, w, 1, nn.ReLU), Block(w, 4 * w, 2 * w, 2, nn.ReLU),
                         Block(2 * w, 6 * w, 2 * w, 1, nn.Hardswish),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, classes))


def trained_fp32_file(ds, path):
    """The net trained on ``ds`` (300 steps), its ranges spread, exported as the user's FP32 ONNX file."""
    torch.manual_seed(0)
    net = mobile_net()
    fit(net, ds, FitConfig(steps=300, lr=0.05, batch_size=64, eval_every=100), seed=0)
    x = torch.from_numpy(next(ds.batches("val", 64))[0])
    with torch.no_grad():
        before = net(x)
    g = torch.Generator().manual_seed(1)
    for block in (net[3], net[4]):
        n = block.expand[0].out_channels
        block.spread_ranges(torch.exp((torch.rand(n, generator=g) * 2 - 1) * np.log(SPREAD)))
    with torch.no_grad():
        assert float((net(x) - before).abs().max()) < 1e-4  # the same function
    return export_onnx(net, ds.input_shape, path)


def with_onnx_source(ir: ModelArtifact, onnx_file) -> ModelArtifact:
    """The IR variant with its FP32 ONNX file beside it, which int8-qat trains from."""
    shutil.copy2(onnx_file, ir.path / ONNX_SOURCE)
    return ir


def val_accuracy(art: ModelArtifact, runtime: str, ds) -> float:
    x, y = ds.split("val")
    return float((make_predictor(runtime, art.model_file).predict_batched(x).argmax(1) == y).mean())


@pytest.fixture
def one_thread():
    """torch on one thread: on two busy shared cores, torch's two OpenMP threads waiting on each other
    made this test take 616 s; on one thread it took 93 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow  # trains a net, then PTQ and a 150-step QAT on each format
def test_qat_beats_ptq_where_ptq_loses_and_runs_int8_on_both_runtimes(test_split_gone, one_thread, tmp_path):  # noqa: F811
    ds, asked = test_split_gone
    fp32_file = trained_fp32_file(ds, tmp_path / "mobile.onnx")
    brought = onnx_teacher(fp32_file, ds)
    # the project's PTQ, its first layer quantized as QAT's is (ignore_first auto would time both on this CPU)
    q = QuantConfig(calibration_samples=200, nncf={"ignore_first": False}, qat={"steps": 150})
    built, acc = {}, {}
    for fmt in formats_for("int8-qat"):
        fp32 = export_checkpoint(brought, fmt, ds, f"mobile-fp32-{fmt}")
        if fmt == "openvino" and not (fp32.path / ONNX_SOURCE).is_file():
            with_onnx_source(fp32, fp32_file)  # until the IR export keeps its ONNX source
        runtime = formats.get(fmt).native_runtime
        for p in ("fp32", "int8", "int8-qat"):
            art = fp32 if p == "fp32" else quantize_model(fp32, p, ds, q, 0, f"mobile-{p}-{fmt}")
            assert not art.failed, art.manifest["reason"]
            built[f"{p}-{fmt}"], acc[(p, fmt)] = art, val_accuracy(art, runtime, ds)
        qat = built[f"int8-qat-{fmt}"]
        assert qat.manifest["qat"]["int8_layers"] == int8_coverage(runtime, qat.model_file)["int8_ops"] > 0
        assert qat.manifest["qat"]["float_layers"] == 0  # every convolution and the classifier in INT8
        assert qat.manifest["method"].startswith("PT2E QAT U8S8") and qat.manifest["recipe"]["steps"] == 150
    assert int8_coverage("openvino", built["int8-qat-onnx"].model_file)["int8_ops"] > 0  # OpenVINO reads the ONNX too

    xv = ds.split("val")[0]
    measured = measure_models({k: (formats.get(a.format).native_runtime, a.model_file) for k, a in built.items()},
                              lambda: [xv], xv[:1], threads=1, batch=1, warmup=20, iterations=300)
    for (p, fmt), a in acc.items():
        m = measured[f"{p}-{fmt}"]
        print(f"{p:9s} {fmt:9s} val {100 * a:5.1f} %  p50 {1e3 * m.latency.p50_ms:6.1f} us  "
              f"int8 {m.coverage['int8_ops']}/{m.coverage['int8_ops'] + m.coverage['float_ops']}")
    for fmt in formats_for("int8-qat"):
        fp32, ptq, qat = (acc[(p, fmt)] for p in ("fp32", "int8", "int8-qat"))
        assert fp32 - ptq >= 0.02, (fmt, fp32, ptq)  # PTQ loses points on this net...
        assert qat >= ptq + 0.01, (fmt, ptq, qat)  # ...and QAT wins some back
    assert "test" not in asked and {"train", "val"} <= set(asked), sorted(set(asked))


def test_a_qat_the_conversion_refuses_fails_that_variant_alone_with_the_reason(digits, tmp_path):
    """A Shrink operator (onnx2torch has no converter): int8-qat fails naming the node, int8 builds."""
    brought = onnx_teacher(_shrink(tmp_path / "shrink.onnx"), digits)
    fp32 = export_checkpoint(brought, "onnx", digits, "shrink-fp32-onnx")
    q = QuantConfig(calibration_samples=16)
    qat, ptq = (quantize_model(fp32, p, digits, q, 0, f"shrink-{p}-onnx") for p in ("int8-qat", "int8"))
    assert qat.failed and not ptq.failed
    reason = qat.manifest["reason"]
    assert reason.startswith("QATError: no torch model to train: ") and "'hardshrink' (Shrink)" in reason, reason
    assert qat.manifest["recipe"]["scheme"] == "int8-qat" and qat.manifest["recipe"]["steps"] == 100


def test_an_ir_without_its_onnx_source_fails_with_the_reason(digits):
    ir = new_workdir("ir")
    (ir / "model.xml").write_text("<net/>")
    (ir / "model.bin").write_bytes(b"")
    art = ModelArtifact.write(ir, {"variant": "m-fp32-openvino", "format": "openvino", "status": "ok",
                                   "recipe": {"scheme": "fp32"}, "lineage": {}})
    failed = quantize_model(art, "int8-qat", digits, QuantConfig(calibration_samples=8), 0, "m-int8-qat-openvino")
    assert failed.failed and failed.manifest["reason"] == (
        f"QATError: model.xml: no FP32 ONNX file beside it ({ONNX_SOURCE}): QAT trains the model's torch conversion, "
        f"which only an ONNX file gives")


def test_the_recipe_records_every_option_and_the_config_checks_them(tiny_raw):
    recipe = get("int8-qat")
    assert formats_for("int8-qat") == ("onnx", "openvino")
    opts = recipe.options(QuantConfig(qat={"steps": 7, "lr": 0.01, "kd": {"temperature": 2.0}, "device": "cpu"},
                                      onnxruntime={"reduce_range": True}))
    used, method = recipe.recipe("onnx", opts, 32)
    assert used | {"steps": 7, "lr": 0.01, "kd_temperature": 2.0, "kd_alpha": 0.9, "device": "cpu", "reduce_range": True,
                   "weights": "int8 symmetric per-channel [-64, 64]", "calibration_samples": 32, "eval_every": 1,
                   "quantized": "conv/linear input, weights, output", "optimizer": "adamw"} == used
    assert method == ("PT2E QAT U8S8 per-channel reduce-range, 7 steps of KD from FP32 (T=2, alpha=0.9), AdamW lr "
                      "0.01, exported as ONNX QDQ")
    ir, _ = recipe.recipe("openvino", opts, 32)
    assert ir["quantized"] == "conv/linear input, weights" and ir["reduce_range"] is False
    raw = {**tiny_raw, "variants": {**tiny_raw["variants"], "quantization": ["fp32", "int8-qat"],
                                    "quant": {"qat": {"steps": 0}}}}
    with pytest.raises(ConfigError, match=r"^tiny.yaml: variants.quant.qat.steps"):
        parse_config(raw, "tiny.yaml")
