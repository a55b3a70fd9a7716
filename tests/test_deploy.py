import json
import os

import pytest

from edgeopt import deploy as dep
from edgeopt.artifacts import new_workdir


def _model_dir(content: bytes):
    d = new_workdir("m")
    (d / "model.onnx").write_bytes(content)
    return d


def _deploy(root, content: bytes, keep=3):
    return dep.deploy(_model_dir(content), root, name="m", model_files=["model.onnx"],
                      runtime={"runtime": "onnxruntime", "threads": 1}, labels=["a", "b"],
                      info={"version": content.decode()}, keep=keep)


def test_deploy_switches_current_and_keeps_last_n(tmp_path):
    root = tmp_path / "deploy"
    for i in range(5):
        b = _deploy(root, f"v{i}".encode())
        cur = dep.current(root)
        assert cur.path == b.path and (cur.path / "model.onnx").read_bytes() == f"v{i}".encode()
        cur.verify()
    assert len(dep.bundles(root)) == 3
    assert os.readlink(root / "current").startswith("versions/")
    assert json.loads((dep.current(root).path / "labels.json").read_text()) == ["a", "b"]


def test_a_crash_mid_write_leaves_the_old_bundle_current(tmp_path, monkeypatch):
    root = tmp_path / "deploy"
    first = _deploy(root, b"good")

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(dep, "fsync_tree", crash)
    with pytest.raises(OSError, match="disk full"):
        _deploy(root, b"new")
    assert dep.current(root).path == first.path
    dep.current(root).verify()
    assert not list((root / "versions").glob(".tmp-*"))


def test_verify_detects_a_tampered_bundle(tmp_path):
    b = _deploy(tmp_path / "deploy", b"payload")
    (b.path / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="does not match its sha256"):
        b.verify()
