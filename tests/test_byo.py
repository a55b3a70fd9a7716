"""Bring your own data and teacher: ImageFolder trees, state-dict/safetensors and ONNX teachers."""

import numpy as np
import pytest
import torch

from edgeopt.config import ConfigError, DataConfig, StudentConfig, TeacherConfig
from edgeopt.data.sources import DataError, load_dataset
from edgeopt.models.brought import PretrainedError
from edgeopt.models.export import export_checkpoint, export_onnx
from edgeopt.models.zoo import build_model, load_checkpoint
from edgeopt.plan import parse_config
from edgeopt.train.fit import distill_student
from edgeopt.train.teacher import train_teacher
from examples.make_shapes import make_shapes
from tests._tiny import TINY

pytestmark = pytest.mark.slow  # trains and distills models (docs/tests.md: the inner loop skips them)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = make_shapes(tmp_path_factory.mktemp("shapes"), per_class=12, size=24)
    return load_dataset(DataConfig(source="imagefolder", root=root, image_size=(16, 16),
                                   mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]), seed=0)


def test_imagefolder_is_resized_normalized_and_split(shapes):
    assert shapes.classes == ["circle", "square", "triangle"] and shapes.input_shape == [3, 16, 16]
    x, y = shapes.split("train")
    assert x.dtype == np.float32 and x.shape[1:] == (3, 16, 16)
    assert -2.1 <= x.min() and x.max() <= 2.1  # (pixel/255 - 0.5) / 0.25 is within [-2, 2]
    assert x.min() < -1.5  # the dark backgrounds (0-89) normalized: un-normalized pixels would stay in [0, 1]
    assert shapes.manifest["mean"] == [0.5, 0.5, 0.5] and sum(shapes.manifest["sizes"].values()) == 36


def test_imagefolder_errors_name_the_file(tmp_path):
    root = make_shapes(tmp_path / "imgs", per_class=4, size=16)
    bad = root / "circle" / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        load_dataset(DataConfig(source="imagefolder", root=root), seed=0)
    bad.unlink()
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="empty: class folder holds no image"):
        load_dataset(DataConfig(source="imagefolder", root=root), seed=0)


def _arch(ds, name="resnet18"):
    return {"name": name, "num_classes": len(ds.classes), "in_channels": ds.input_shape[0], "width": 0}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_teacher_from_a_torchvision_state_dict(shapes, tmp_path, suffix):
    torch.manual_seed(0)
    net = build_model("resnet18", 3, 3, 0).eval()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": net.state_dict(), "epoch": 7}, path)  # a training checkpoint layout
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    ckpt = train_teacher(shapes, TeacherConfig(arch="resnet18", checkpoint=path), seed=0)
    loaded = load_checkpoint(ckpt)
    x = torch.from_numpy(shapes.split("val")[0][:4])
    with torch.inference_mode():
        assert torch.allclose(loaded(x), net(x), atol=1e-5)  # the very weights of the file
    assert ckpt.manifest["params"] == sum(p.numel() for p in net.parameters())
    assert ckpt.manifest["history"]["source_sha256"]


def test_a_checkpoint_that_does_not_fit_is_explained(shapes, tmp_path):
    path = tmp_path / "imagenet_head.pt"
    torch.save(build_model("resnet18", 1000, 3, 0).state_dict(), path)  # 1000 classes, the data has 3
    with pytest.raises(PretrainedError, match=r"imagenet_head.pt: does not fit .*fc.weight: file \[1000, 512\] vs model \[3, 512\]"):
        train_teacher(shapes, TeacherConfig(arch="resnet18", checkpoint=path), seed=0)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(PretrainedError, match="junk.pt: not a loadable state dict"):
        train_teacher(shapes, TeacherConfig(arch="resnet18", checkpoint=junk), seed=0)


def test_teacher_from_an_onnx_file_distills_and_exports(shapes, tmp_path):
    torch.manual_seed(0)
    net = build_model("small_cnn", 3, 3, 8).eval()
    path = export_onnx(net, shapes.input_shape, tmp_path / "teacher.onnx")
    ckpt = train_teacher(shapes, TeacherConfig(onnx=path), seed=0)
    assert ckpt.onnx_file is not None and ckpt.manifest["params"] > 0 and ckpt.manifest["output"] == "logits"
    x = shapes.split("test")[0]
    with torch.inference_mode():  # the logits of the file are the logits of the net it came from
        torch.testing.assert_close(load_checkpoint(ckpt)(torch.from_numpy(x)), net(torch.from_numpy(x)),
                                   atol=1e-5, rtol=1e-4)
    student = distill_student(shapes, ckpt, StudentConfig(arch="small_cnn", width=4, epochs=1), seed=0)
    assert student.manifest["lineage"]["teacher"] == ckpt.content_hash[:12]
    for fmt in ("onnx", "openvino"):
        exported = export_checkpoint(ckpt, fmt, shapes, f"teacher-fp32-{fmt}")
        assert not exported.failed and exported.manifest["parity_max_abs_diff"] < 1e-3
    wrong = build_model("small_cnn", 5, 3, 8).eval()  # 5 outputs for 3 classes
    with pytest.raises(PretrainedError, match="has 5 classes; the dataset has 3"):
        train_teacher(shapes, TeacherConfig(arch="small_cnn", onnx=export_onnx(wrong, shapes.input_shape, tmp_path / "w.onnx")), seed=0)


def test_torchvision_student_on_grayscale_data():
    model = build_model("mobilenet_v3_small", 10, 1, 0).eval()
    with torch.inference_mode():
        assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_teacher_source_is_validated_up_front(tmp_path):
    raw = {**TINY, "teacher": {**TINY["teacher"], "checkpoint": str(tmp_path / "missing.pt")}}
    with pytest.raises(ConfigError, match="cfg: teacher.checkpoint: file not found"):
        parse_config(raw, "cfg")
    (tmp_path / "t.bin").write_bytes(b"x")
    raw = {**TINY, "teacher": {**TINY["teacher"], "checkpoint": str(tmp_path / "t.bin")}}
    with pytest.raises(ConfigError, match="expected a .pt/.pth/.safetensors file"):
        parse_config(raw, "cfg")
    raw = {**TINY, "data": {"source": "digits", "mean": [0.5]}}
    with pytest.raises(ConfigError, match="data.mean and data.std go together"):
        parse_config(raw, "cfg")
