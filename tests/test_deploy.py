"""Bundles: atomic switch, pruning, the history, verification of every file, one model per root,
and a bundle that its runtime cannot load never becomes current."""

import json
import os

import pytest

from edgeopt.deploy import folder as dep
from tests._deploy_kit import LABELS, deploy_info, model_dir


def _deploy(root, seed: int, keep=3, name="m", version=None, labels=LABELS):
    return dep.deploy(model_dir(seed).path, root, name=name, model_files=["model.onnx"],
                      runtime={"runtime": "onnxruntime", "threads": 1}, labels=labels,
                      info=deploy_info(name, str(version or seed)), keep=keep)


def test_deploy_switches_current_keeps_last_n_and_writes_the_history(tmp_path):
    root = tmp_path / "deploy"
    deployed = []
    for i in range(5):
        b = _deploy(root, i)
        deployed.append(b.path.name)
        cur = dep.current(root)
        assert cur.path == b.path and cur.manifest["version"] == str(i)
        cur.verify()
    assert len(dep.bundles(root)) == 3
    assert os.readlink(root / "current").startswith("versions/")
    assert json.loads((dep.current(root).path / "labels.json").read_text()) == LABELS
    history = dep.history(root)
    assert [e["to"] for e in history] == deployed
    assert [e["previous"] for e in history] == [None, *deployed[:-1]]
    assert all(len(e["model_sha256"]) == 64 and e["registered_model"] == "m" for e in history)
    assert len({e["model_sha256"] for e in history}) == 5  # five different models
    assert list(dep.served_before(root, deployed[-1])) == deployed[-2::-1]


def test_a_crash_mid_write_leaves_the_old_bundle_current(tmp_path, monkeypatch):
    root = tmp_path / "deploy"
    first = _deploy(root, 0)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(dep, "fsync_tree", crash)
    with pytest.raises(OSError, match="disk full"):
        _deploy(root, 1)
    assert dep.current(root).path == first.path
    dep.current(root).verify()
    assert not list((root / "versions").glob(".tmp-*"))
    assert [e["to"] for e in dep.history(root)] == [first.path.name]


def test_a_bundle_its_runtime_cannot_load_never_becomes_current(tmp_path):
    root = tmp_path / "deploy"
    good = _deploy(root, 0)
    bad = model_dir(1)
    (bad.path / "model.onnx").write_bytes(b"\x08\x07not a model")
    with pytest.raises(dep.DeployError, match="does not load: .*Fail|does not load: .*Invalid"):
        dep.deploy(bad.path, root, name="m", model_files=["model.onnx"], runtime={"runtime": "onnxruntime"},
                   labels=LABELS, info=deploy_info("m", "2"))
    with pytest.raises(dep.DeployError, match="labels.json names 3 classes"):  # the model has 2 outputs
        _deploy(root, 2, labels=["a", "b", "c"])
    assert dep.current(root).path == good.path and len(dep.bundles(root)) == 1
    assert not list((root / "versions").glob(".tmp-*"))


def test_verify_covers_every_file_and_refuses_names_outside_the_bundle(tmp_path):
    b = _deploy(tmp_path / "deploy", 0)
    b.verify()
    (b.path / "model.bin").write_bytes(b"weights a runtime would read")  # present but not listed
    with pytest.raises(ValueError, match="file model.bin is not listed"):
        b.verify()
    (b.path / "model.bin").unlink()
    (b.path / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="does not match its sha256"):
        b.verify()
    manifest = json.loads((b.path / "manifest.json").read_text())
    for files, model_file, words in [
        ({}, "model.onnx", "lists no files"),
        ({"../../../../outside/hostname": {"sha256": "0" * 64, "bytes": 1}}, "model.onnx", "outside the bundle"),
        ({str(tmp_path / "hostname"): {"sha256": "0" * 64, "bytes": 1}}, "model.onnx", "outside the bundle"),
        ({**manifest["files"]}, str(tmp_path / "other.onnx"), "is not listed"),
        ({k: v for k, v in manifest["files"].items() if k != "labels.json"}, "model.onnx", "labels.json is not listed"),
    ]:
        (b.path / "manifest.json").write_text(json.dumps({**manifest, "files": files, "model_file": model_file}))
        with pytest.raises(ValueError, match=words):
            dep.Bundle(b.path).verify()
    (b.path / "manifest.json").write_text(json.dumps({**manifest, "model_file": "../../x.onnx"}))
    with pytest.raises(ValueError, match="outside the bundle"):
        _ = dep.Bundle(b.path).model_file


def test_a_deploy_root_serves_one_registered_model(tmp_path):
    root = tmp_path / "deploy"
    _deploy(root, 0, name="digits")
    with pytest.raises(dep.DeployError) as err:
        _deploy(root, 1, name="shapes")
    assert str(err.value).count("\n") == 0 and "holds bundles of registered model 'digits'" in str(err.value)
    assert "give 'shapes' a deploy.root of its own" in str(err.value)
    assert dep.current(root).manifest["registered_model"] == "digits" and len(dep.bundles(root)) == 1


def test_an_interrupted_prune_or_a_broken_manifest_does_not_break_the_next_deploy(tmp_path):
    root = tmp_path / "deploy"
    _deploy(root, 0)
    (root / "versions" / "x").mkdir()
    (root / "versions" / "x" / "manifest.json").write_text("{}")  # a manifest without created_at
    (root / "versions" / ".trash-1234").mkdir()  # a prune cut short
    (root / "history.jsonl").open("a").write('{"cut short')  # a history line cut short by a crash
    b = _deploy(root, 1)
    assert dep.current(root).path == b.path
    assert not (root / "versions" / ".trash-1234").exists()
    assert [e["to"] for e in dep.history(root)][-1] == b.path.name


def test_current_that_is_a_folder_is_refused_in_one_line(tmp_path):
    root = tmp_path / "deploy"
    _deploy(root, 0)
    target = (root / "current").resolve()
    (root / "current").unlink()
    os.mkdir(root / "current")
    (root / "current" / "manifest.json").write_text((target / "manifest.json").read_text())
    with pytest.raises(dep.DeployError, match="current: is a folder, not the link edgeopt switches"):
        _deploy(root, 1)
