"""ExecuTorch (.pte lowered to XNNPACK) as a format, a runtime and INT8/FP16 recipes, on digits.

Every kind of base exports to a ``.pte`` that the ExecuTorch runtime loads and runs once against its
torch model (a brought ONNX model through its torch conversion, against the file); INT8 (PT2E,
XNNPACKQuantizer) and FP16 are rebuilt from the torch program kept beside the FP32 file; an operator
the runtime cannot run fails that variant with the operator named; a deployed ``.pte`` is served.
"""

from __future__ import annotations

import httpx2 as httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from bench.serve_load import deploy_tiny, running_server
from edgeopt.artifacts import new_workdir
from edgeopt.config import QuantConfig
from edgeopt.formats import get
from edgeopt.formats.torch_source import SOURCE
from edgeopt.models import export as export_module
from edgeopt.models.export import export_checkpoint
from edgeopt.models.zoo import build_model, load_checkpoint, save_checkpoint
from edgeopt.precisions import quantize_model
from edgeopt.runtimes import make_predictor
from edgeopt.runtimes.coverage import int8_coverage
from edgeopt.serve.app import create_app
from tests._edge import KINDS, SHAPE, AdaptiveMaxPool, accuracy, bases, files

FMT = "executorch"


@pytest.fixture(scope="module")
def untrained():
    """A checkpoint of a small CNN, no training: enough for what does not need a model that learned."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, 8)
    return save_checkpoint(model, role="teacher", arch={"name": "small_cnn", "num_classes": 10, "in_channels": 1,
                                                        "width": 8}, input_shape=SHAPE, info={"base": "teacher"})


@pytest.mark.slow  # trains the bases
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_base_exports_to_pte_checked_against_its_model(kind, digits, teacher_ckpt, student_ckpt):
    base = bases(digits, teacher_ckpt, student_ckpt)[kind]
    art = export_checkpoint(base, FMT, digits, f"{kind}-fp32-executorch")
    assert not art.failed, art.manifest["reason"]
    m = art.manifest
    assert files(art.path) == {"model.pte", SOURCE, "manifest.json"} and art.model_file.name == "model.pte"
    assert m["parity_max_abs_diff"] < 1e-3 and m["delegated_fraction"] > 0.8, m
    p = make_predictor(FMT, art.model_file)
    assert p.fixed_batch == 1 and p.settings["delegate"] == "XNNPACK"
    # the same top-1 accuracy as the model it came from (a brought ONNX model: the file, run by ONNX Runtime)
    with torch.inference_mode():
        want = accuracy(lambda x: load_checkpoint(base)(torch.from_numpy(x)).numpy(), digits)
    assert abs(accuracy(p.predict_batched, digits) - want) < 0.005
    assert want > 0.8


@pytest.mark.slow  # trains the student
def test_int8_and_fp16_are_rebuilt_from_the_torch_program(digits, student_ckpt):
    fp32 = export_checkpoint(student_ckpt, FMT, digits, "student-fp32-executorch")
    quant = QuantConfig(calibration_samples=64)
    int8 = quantize_model(fp32, "int8", digits, quant, 0, "student-int8-executorch")
    fp16 = quantize_model(fp32, "fp16", digits, quant, 0, "student-fp16-executorch")
    assert not int8.failed and not fp16.failed, (int8.manifest.get("reason"), fp16.manifest.get("reason"))
    assert int8.manifest["recipe"]["weights"] == "int8 symmetric per-channel"
    assert int8.manifest["recipe"]["calibration_samples"] == 64 and "XNNPACKQuantizer" in int8.manifest["method"]
    assert files(int8.path) == {"model.pte", "manifest.json"}  # the program stays with the FP32 export
    cov = int8_coverage(FMT, int8.model_file)
    assert cov["int8_ops"] >= 3 and cov["float_ops"] == 0 and cov["delegated_fraction"] > 0.9, cov
    assert int8_coverage(FMT, fp32.model_file)["int8_ops"] == 0
    assert int8.model_bytes < 0.7 * fp32.model_bytes  # a tiny model: the program's own bytes weigh
    acc = {a.variant: accuracy(make_predictor(FMT, a.model_file).predict_batched, digits) for a in (fp32, int8, fp16)}
    assert acc["student-int8-executorch"] > acc["student-fp32-executorch"] - 0.02, acc
    assert abs(acc["student-fp16-executorch"] - acc["student-fp32-executorch"]) < 0.005, acc


def test_an_operator_the_runtime_cannot_run_fails_that_variant_naming_it(untrained, digits, monkeypatch):
    class Sorts(nn.Module):  # aten::sort lowers, but XNNPACK does not take it and the runtime has no kernel
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 64, 10)

        def forward(self, x):
            return self.fc(torch.flatten(torch.sort(self.conv(x), dim=3).values, 1))

    reasons = {}
    for net in (AdaptiveMaxPool(), Sorts()):
        monkeypatch.setattr(export_module, "load_checkpoint", lambda ckpt, net=net: net.eval())
        art = export_checkpoint(untrained, FMT, digits, "teacher-fp32-executorch")
        assert art.failed and art.manifest["status"] == "failed"
        reasons[type(net).__name__] = art.manifest["reason"]
    assert reasons["AdaptiveMaxPool"].startswith("UnsupportedOperator: ExecuTorch cannot take operator "
                                                 "aten.adaptive_max_pool2d.default: "), reasons
    assert reasons["Sorts"] == ("UnsupportedOperator: ExecuTorch cannot run operator aten::sort.values: XNNPACK does "
                                "not take it and the runtime has no kernel for it"), reasons
    monkeypatch.undo()  # the model of the checkpoint itself exports: only that variant failed
    assert not export_checkpoint(untrained, FMT, digits, "teacher-fp32-executorch").failed


def _pte_folder(seed: int = 0):
    torch.manual_seed(seed)
    out = new_workdir("tiny-pte")
    get(FMT).from_torch(build_model("small_cnn", 10, 1, 8).eval(), SHAPE, out)
    return out


def test_a_deployed_pte_bundle_is_served(tmp_path):
    folder = _pte_folder()
    root = tmp_path / "deploy"
    bundle = deploy_tiny(root, folder, fmt=FMT, version="1")
    assert sorted(bundle.manifest["files"]) == ["labels.json", "model.pte", "runtime.json"]  # no torch program
    x = np.random.default_rng(0).normal(0, 1, (3, *SHAPE)).astype(np.float32)
    logits = make_predictor(FMT, bundle.model_file).predict_batched(x)
    want = np.exp(logits - logits.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    with TestClient(create_app(root)) as c:
        meta = c.get("/metadata").json()
        assert meta["runtime"]["runtime"] == FMT and meta["manifest"]["model_file"] == "model.pte"
        r = c.post("/predict", json={"inputs": x.tolist()})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose([p["probabilities"] for p in r.json()["predictions"]], want, atol=1e-5)


@pytest.mark.slow  # starts `run.py serve`
def test_run_py_serve_serves_a_pte_bundle(tmp_path):
    root = tmp_path / "deploy"
    deploy_tiny(root, _pte_folder(1), fmt=FMT, version="3")
    x = np.zeros((2, *SHAPE), np.float32)
    with running_server(root) as live:
        health = httpx.get(f"{live}/health", timeout=10).json()
        assert health["status"] == "ok" and health["runtime"] == FMT
        r = httpx.post(f"{live}/predict", json={"inputs": x.tolist()}, timeout=30)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2, r.text
