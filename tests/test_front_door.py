"""The front door: `edgeopt optimize MODEL --data DIR` and `edgeopt.optimize(...)` on a model and images made
here, the traps of a brought model (its normalization, its class order, a score near chance), paths relative
to the config file, `--set`, `--json`, `--version`, the user's ZenML and MLflow settings, and the same
command from a wheel installed outside the checkout.

The traps use a model whose answer depends on nothing but the normalization: it averages the pixels and
says "bright" above 1.5 once they are normalized with ImageNet's statistics, so fed any other way it says
"dim" to every image (chance). The end-to-end runs use a small CNN trained here on examples/make_shapes.py's
shapes and exported the ordinary way (torch.onnx.export at batch 1).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from click.testing import CliRunner
from onnx import TensorProto, helper
from PIL import Image

import edgeopt
from edgeopt.config import ConfigError
from edgeopt.config.data import normalization
from edgeopt.config.load import apply_overrides
from edgeopt.data import images
from edgeopt.data.sources import DataError, load_dataset
from edgeopt.plan import load_config, parse_config
from edgeopt.plan.reference import ReferenceError, best_class_order, prepare_reference
from edgeopt_zenml.cli import cli
from examples.make_shapes import make_shapes
from tests._tiny import ROOT
from tests.test_own_pipeline import _sh
from tests.test_own_pipeline import wheel_venv as _wheel_venv_fixture

wheel_venv = _wheel_venv_fixture  # the wheel venv fixture (module-scoped), shared with test_own_pipeline

FAST = ["--set", "target.warmup=2", "--set", "target.iterations=20"]


def bright_dim(root: Path, per_class: int = 20, seed: int = 0) -> Path:
    """An ImageFolder of 8x8 grey-ish images: bright/ (pixels near 0.95) and dim/ (near 0.6)."""
    rng = np.random.default_rng(seed)
    for cls, level in (("bright", 0.95), ("dim", 0.6)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = np.clip(rng.normal(level * 255, 6, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / cls / f"{i:02d}.png")
    return root


def brightness_model(path: Path, order=("bright", "dim"), metadata=None) -> Path:
    """An ONNX classifier (GlobalAveragePool -> Gemm) whose class ``order[0]`` is "mean ImageNet-normalized
    pixel above 1.5": right on bright_dim's images normalized with ImageNet's statistics only."""
    bright = order.index("bright")
    w = np.zeros((3, 2), np.float32)
    w[:, bright] = 10 / 3
    b = np.zeros(2, np.float32)
    b[bright] = -15
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["pixels"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("Gemm", ["flat", "w", "b"], ["scores"])],
        "brightness", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor("w", TensorProto.FLOAT, [3, 2], w.ravel()), helper.make_tensor("b", TensorProto.FLOAT, [2], b)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in (metadata or {}).items():
        m.metadata_props.add(key=key, value=value)
    onnx.save(m, str(path))
    return path


def brought(tmp: Path, model: Path, data: Path, **data_options) -> dict:
    return {"name": "front", "data": {"source": "imagefolder", "root": str(data), **data_options},
            "teacher": {"onnx": str(model)}, "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
            "deploy": {"root": str(tmp / "deploy")}}


@pytest.fixture(scope="module")
def imgs(tmp_path_factory) -> Path:
    return bright_dim(tmp_path_factory.mktemp("bright_dim") / "imgs")


# ------------------------------------------------------------------------------------- the traps

def test_an_imagenet_model_with_default_statistics_is_refused_with_the_reason(tmp_path, imgs):
    cfg = parse_config(brought(tmp_path, brightness_model(tmp_path / "m.onnx"), imgs))
    with pytest.raises(ReferenceError) as err:
        prepare_reference(cfg)
    msg = str(err.value)
    assert "scores 50.0 %" in msg and "near chance (50.0 %" in msg and "the train split's statistics" in msg
    assert "with imagenet (mean [0.485, 0.456, 0.406]" in msg and "it scores 100.0 %" in msg and "--force" in msg
    forced = prepare_reference(cfg.model_copy(update={"checks": cfg.checks.model_copy(update={"near_chance": "warn"})}))
    assert forced.config.data.mean is None and any("near chance" in w for w in forced.warnings)
    assert any("set data.mean: imagenet" in w for w in forced.warnings)  # and what would fit


def test_auto_detects_the_imagenet_normalization_and_says_so(tmp_path, imgs):
    cfg = parse_config(brought(tmp_path, brightness_model(tmp_path / "m.onnx"), imgs, mean="auto"))
    prepared = prepare_reference(cfg)
    assert (prepared.config.data.mean, prepared.config.data.std) == tuple(normalization("imagenet", 3))
    assert prepared.normalization == "imagenet" and prepared.accuracy == 1.0 and not prepared.warnings
    assert prepared.scores["imagenet"] == 1.0 and prepared.scores["train"] == 0.5 and prepared.scores["zero-one"] == 0.5
    assert "normalization: imagenet" in prepared.notes[0] and "best of the candidates" in prepared.notes[0]


def test_the_models_metadata_gives_normalization_and_class_order(tmp_path, imgs):
    meta = {"mean": "[123.675, 116.28, 103.53]", "std": "58.395, 57.12, 57.375", "names": "{0: 'dim', 1: 'bright'}"}
    cfg = parse_config(brought(tmp_path, brightness_model(tmp_path / "m.onnx", ("dim", "bright"), meta), imgs))
    prepared = prepare_reference(cfg)  # mean unset: the metadata's wins over the train split's
    assert prepared.normalization == "metadata" and prepared.accuracy == 1.0
    assert prepared.config.data.labels == ["dim", "bright"]
    assert np.allclose(prepared.config.data.mean, [0.485, 0.456, 0.406]) and "class order: the model's own" in prepared.notes[0]


def test_a_label_map_is_honoured(tmp_path, imgs):
    model = brightness_model(tmp_path / "m.onnx", ("dim", "bright"))  # its class 0 is dim: not the sorted order
    cfg = parse_config(brought(tmp_path, model, imgs, mean="imagenet"))
    with pytest.raises(ReferenceError, match=r"scores 0.0 % .* class order \(data.labels.* in the class order "
                                             r"data.labels: \[dim, bright\] \(output index -> folder name\) it scores 100.0 %"):
        prepare_reference(cfg)
    forced = prepare_reference(cfg.model_copy(update={"checks": cfg.checks.model_copy(update={"near_chance": "warn"})}))
    assert forced.config.data.labels is None  # named, not applied on its own
    assert any(w.startswith("the brought model scores 0.0 % with class i as the i-th of [bright, dim]; in the class "
                            "order data.labels: [dim, bright]") for w in forced.warnings), forced.warnings
    (tmp_path / "labels.txt").write_text("dim\nbright\n")
    (tmp_path / "labels.json").write_text(json.dumps({"1": "bright", "0": "dim"}))
    for labels in (str(tmp_path / "labels.txt"), str(tmp_path / "labels.json"), ["dim", "bright"]):
        cfg = parse_config(brought(tmp_path, model, imgs, mean="imagenet", labels=labels))
        assert prepare_reference(cfg).accuracy == 1.0
        ds = load_dataset(cfg.data, 0)
        x, y = ds.split("val")
        assert ds.classes == ["dim", "bright"] and ((x.mean(axis=(1, 2, 3)) > 1.5) == (y == 1)).all()
    (tmp_path / "bad.txt").write_text("dim\ncat\n")
    with pytest.raises(DataError, match="names no class folder: 'cat'; it has no entry for the class folder.s. 'bright'"):
        load_dataset(parse_config(brought(tmp_path, model, imgs, labels=str(tmp_path / "bad.txt"))).data, 0)


def test_the_class_order_that_fits_is_found_on_the_confusion_matrix():
    classes = ["cat", "coffee", "flower", "rocket"]
    y = np.repeat(np.arange(4), 25)
    predicted = np.array([0, 1, 3, 2])[y]  # the model learned flower and rocket the other way round
    predicted[:5] = 1  # and misses 5 cats
    assert best_class_order(predicted, y, classes) == (["cat", "coffee", "rocket", "flower"], 0.95)
    assert best_class_order(y, y, classes) == (classes, 1.0)


def test_a_state_dict_is_brought_and_scored_the_same_way(tmp_path, imgs):
    import torch

    from edgeopt.models.zoo import build_model
    from edgeopt_zenml.api import optimize_config

    torch.manual_seed(0)
    torch.save(build_model("small_cnn", 2, 3, 4).state_dict(), tmp_path / "net.pt")  # untrained: near chance
    cfg = optimize_config(tmp_path / "net.pt", imgs, ["teacher.width=4"], arch="small_cnn", force=True)
    assert (cfg.teacher.checkpoint, cfg.teacher.arch, cfg.data.mean) == (tmp_path / "net.pt", "small_cnn", "auto")
    assert cfg.variants.bases == ["teacher"] and not cfg.deploy.enabled and cfg.registry.name == "edgeopt-net"
    prepared = prepare_reference(cfg)
    assert set(prepared.scores) == {"imagenet", "zero-one", "minus-one-one", "train"}
    assert any("near chance" in w for w in prepared.warnings)  # forced: said, not refused


def test_near_chance_is_the_cli_s_one_line_refusal(tmp_path, imgs):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(brought(tmp_path, brightness_model(tmp_path / "m.onnx"), imgs)))
    result = CliRunner().invoke(cli, ["run", "-c", str(path), "--json"])
    assert result.exit_code == 2, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("edgeopt: error: the brought model m.onnx scores 50.0 %") and last.endswith(
        "go on anyway with --force (checks.near_chance: warn)")
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["exit_code"] == 2 and "near chance" in doc["error"]


def test_center_crop_decodes_the_centre_square_and_the_dataset_records_the_rule(tmp_path):
    """Decoding and the dataset's manifest; serving the same crop is
    test_serving.py::test_training_and_serving_make_the_same_tensor_from_the_same_file."""
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, 16:64] = 255  # white in the middle of a black 2:1 image, wider than the centre square
    Image.fromarray(wide).save(tmp_path / "wide.png")
    stretched = images.decode_image(tmp_path / "wide.png", (16, 16))
    cropped = images.decode_image(tmp_path / "wide.png", (16, 16), crop=1.0)
    assert stretched.shape == cropped.shape == (16, 16, 3)
    assert stretched[:, 0].max() == 0 and cropped.min() > 200  # the crop keeps only the square
    cfg = parse_config({"teacher": {"arch": "small_cnn"}, "data": {"resize": "center_crop", "image_size": [4, 4]}})
    assert cfg.data.resize.mode == "center_crop" and cfg.data.resize.crop_fraction == 0.875
    ds = load_dataset(cfg.data, 0)
    assert ds.manifest["resize"] == {"mode": "center_crop", "crop_fraction": 0.875} and ds.input_shape == [1, 4, 4]
    with pytest.raises(ConfigError, match="center_crop needs data.image_size"):
        parse_config({"teacher": {"arch": "small_cnn"}, "data": {"resize": "center_crop"}})


# ------------------------------------------------------------------------------- config and CLI

def test_paths_are_relative_to_the_config_file(tmp_path, imgs, monkeypatch):
    project = tmp_path / "project"
    bright_dim(project / "imgs", per_class=4)
    brightness_model(project / "model.onnx")
    (project / "labels.txt").write_text("bright\ndim\n")
    raw = {"data": {"source": "imagefolder", "root": "imgs", "labels": "labels.txt"}, "teacher": {"onnx": "model.onnx"},
           "deploy": {"root": "deploy"}}
    (project / "run.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # elsewhere: the paths still mean the ones beside the config
    cfg = load_config(project / "run.yaml")
    assert Path(cfg.data.root).expanduser().is_absolute() and cfg.deploy_root() == project / "deploy"
    assert load_dataset(cfg.data, 0).classes == ["bright", "dim"]
    again = parse_config(cfg.model_dump(mode="json"))  # what the pipeline gets: the same paths, no config folder
    assert again.data.root == cfg.data.root and again.teacher.onnx == project / "model.onnx"
    raw["data"]["root"] = "missing"
    (project / "run.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=re.escape(f"data.root: folder not found: missing (looked in {project})")):
        load_config(project / "run.yaml")


def test_set_overrides_dotted_paths_with_yaml_values():
    raw = {"teacher": {"arch": "small_cnn"}, "targets": [{"label": "a", "url": "http://x:1", "token_env": "T"}]}
    out = apply_overrides(raw, ["target.threads=2", "variants.quantization=[fp32, int8]", "student=null",
                                "targets.0.url=http://y:2", "data.split={val: 0.2, test: 0.2}"])
    assert out["target"] == {"threads": 2} and out["variants"]["quantization"] == ["fp32", "int8"]
    assert out["student"] is None and out["targets"][0]["url"] == "http://y:2" and out["data"]["split"]["val"] == 0.2
    assert raw["targets"][0]["url"] == "http://x:1"  # the original is not changed
    for bad, why in (("target.threads", "expected key.path=value"), ("targets.3.url=x", "is a list of 1"),
                     ("teacher.arch.x=1", "teacher.arch is str")):
        with pytest.raises(ConfigError, match=why):
            apply_overrides(raw, [bad])


def test_validate_takes_set_and_json_and_defaults_its_config(monkeypatch):
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(cli, ["validate", "--json", "--set", "variants.quantization=[fp32]",
                                      "--set", "variants.formats=[onnx]"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] and doc["config"] == "configs/default.yaml" and all("-fp32-onnx@" in v for v in doc["variants"])
    assert "ok (" in result.stderr  # what a person reads goes to stderr under --json
    bad = CliRunner().invoke(cli, ["validate", "--json", "--set", "target.threads=-1"])
    assert bad.exit_code == 2 and json.loads(bad.stdout)["error"].endswith(
        "target.threads: Input should be greater than or equal to 1 (got -1)")


def test_version_and_serve_needs_a_folder_or_a_registered_model():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"edgeopt {edgeopt.__version__}"
    nothing = CliRunner().invoke(cli, ["serve"])
    assert nothing.exit_code == 2 and "--deploy-root DIR" in nothing.stderr and "models:/<name>@<alias>" in nothing.stderr
    bad = CliRunner().invoke(cli, ["serve", "-m", "runs:/abc/model"])
    assert bad.exit_code == 2 and "expected a registered model as models:/<name>@<alias>" in bad.stderr


def test_defaults_follow_what_is_configured():
    assert parse_config({"teacher": {"arch": "small_cnn"}}).variants.bases == ["teacher"]
    both = parse_config({"teacher": {"arch": "small_cnn"}, "student": {"arch": "small_cnn"}})
    assert both.variants.bases == ["teacher", "student"]
    cfg = parse_config({"teacher": {"arch": "small_cnn"}, "data": {"mean": "zero-one"}, "deploy": {"enabled": False}})
    assert (cfg.data.mean, cfg.data.std, cfg.deploy.enabled) == ([0.0], [1.0], False)  # digits: one channel
    with pytest.raises(ConfigError, match="unknown normalization 'imagenette'"):
        parse_config({"teacher": {"arch": "small_cnn"}, "data": {"mean": "imagenette"}})


def test_mlflow_tracking_uri_and_the_stacks_tracker(tmp_path, monkeypatch):
    from edgeopt_zenml.api import check_tracking_env
    from edgeopt_zenml.pipelines import runner

    cfg = parse_config({"teacher": {"arch": "small_cnn"}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.team:5000")
    assert cfg.tracking_uri() == "http://mlflow.team:5000"  # no tracking section: MLflow's own variable
    assert runner.stack_tracking(cfg) == (cfg, None)
    own = parse_config({"teacher": {"arch": "small_cnn"}, "tracking": {"uri": f"sqlite:///{tmp_path}/m.db"}})
    assert own.tracking_uri() == f"sqlite:///{tmp_path}/m.db"  # the config's wins
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "./mlruns")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI=./mlruns: MLflow 3 refuses file stores"):
        check_tracking_env(cfg)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    class Tracker:
        name, flavor, configured = "team-mlflow", "mlflow", False

        def get_tracking_uri(self):
            return "https://alice:pw@mlflow.team"

        def configure_mlflow(self):
            Tracker.configured = True

    class Stack:
        experiment_tracker = Tracker()

    monkeypatch.setattr(runner, "Client", lambda: type("C", (), {"active_stack": Stack()})())
    used, note = runner.stack_tracking(cfg)
    assert used.tracking.uri == "https://alice:pw@mlflow.team" and Tracker.configured
    assert note == "MLflow: the active stack's experiment tracker 'team-mlflow' (https://mlflow.team)"


def test_a_users_zenml_is_honoured(tmp_path):
    """No ZenML of the user's: the embedded store; a global ZenML config (or ZENML_STORE_URL): theirs."""
    code = "import os; from edgeopt.env import configure_local_state; configure_local_state(); " \
           "print(os.environ.get('ZENML_CONFIG_PATH'))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZENML_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "xdg"), EDGEOPT_STATE_DIR=str(tmp_path / "state"), PYTHONPATH=str(ROOT))

    def zenml_config_path(**extra):
        return subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                              timeout=60, check=True).stdout.strip()

    assert zenml_config_path() == str(tmp_path / "state" / "zenml")
    assert zenml_config_path(ZENML_STORE_URL="https://zenml.team") == "None"
    (tmp_path / "xdg" / "zenml").mkdir(parents=True)
    (tmp_path / "xdg" / "zenml" / "config.yaml").write_text("user_id: x\n")
    assert zenml_config_path() == "None"


# ----------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory):
    """examples/make_shapes.py's images and a small CNN trained on them (ImageNet-normalized), exported as
    users do: torch.onnx.export at batch 1, TorchScript exporter, opset 17."""
    import torch
    from torch import nn

    tmp = tmp_path_factory.mktemp("shapes")
    data = make_shapes(tmp / "imgs", per_class=16, size=24)
    files = sorted(data.rglob("*.png"))
    classes = sorted(p.name for p in data.iterdir())
    mean, std = (np.asarray(v, np.float32)[:, None, None] for v in normalization("imagenet", 3))
    x = torch.from_numpy(np.stack([(np.asarray(Image.open(f), np.float32).transpose(2, 0, 1) / 255 - mean) / std
                                   for f in files]).astype(np.float32))
    y = torch.tensor([classes.index(f.parent.name) for f in files])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    assert (net(x).argmax(1) == y).float().mean() > 0.9
    model = tmp / "shapes.onnx"
    torch.onnx.export(net.eval(), x[:1], str(model), input_names=["pixels"], output_names=["scores"], opset_version=17,
                      dynamo=False)
    return model, data


def _check_output(out: Path, report: dict) -> None:
    assert report["winner"] and (out / report["serving"]["model"]).is_file()
    assert {"report.md", "report.json", "config.yaml"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "report.json").read_text())["winner"] == report["winner"]
    assert f"**Winner:** {report['winner']}" in (out / "report.md").read_text()
    again = load_config(out / "config.yaml")  # the next run is a config run
    assert again.teacher.onnx is not None and again.data.mean == normalization("imagenet", 3)[0]
    assert [r["variant"] for r in report["rows"] if r["winner"]] == [report["winner"]]
    assert any(n.startswith("normalization: imagenet") for n in report["notes"])


@pytest.mark.slow  # a pipeline run in a subprocess
def test_optimize_from_the_command_line(shapes_model, tmp_path):
    model, data = shapes_model
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "optimize", str(model), "--data", str(data),
                           "--output", str(out), "--formats", "onnx", "--precisions", "fp32,int8", "--json", *FAST],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # stdout is the JSON document alone
    _check_output(out, report)
    assert report["promotion"] is None and report["serving"]["labels"] == ["circle", "square", "triangle"]
    assert len(report["rows"]) == 4 and "export only" in report["headline"]
    assert not load_config(out / "config.yaml").deploy.enabled


@pytest.mark.slow  # a pipeline run in a subprocess
def test_run_goes_on_when_forced_and_answers_in_json(tmp_path):
    """A config beside its files (relative paths, run from elsewhere), its model near chance on the train
    split's statistics: refused without --force (above), run with it, the warning said, the result JSON."""
    project = tmp_path / "project"
    bright_dim(project / "imgs")
    brightness_model(project / "m.onnx")
    raw = {"name": "forced", "data": {"source": "imagefolder", "root": "imgs"}, "teacher": {"onnx": "m.onnx"},
           "variants": {"quantization": ["fp32"], "formats": ["onnx"], "runtimes": ["onnxruntime"]},
           "deploy": {"enabled": False}}
    (project / "run.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "run", "-c", "project/run.yaml", "--force", "--json",
                           *FAST], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["ok"] and doc["winner"] == "teacher-fp32-onnx@onnxruntime" and doc["promotion"] is None
    assert any("near chance" in w for w in doc["warnings"]) and "edgeopt: warning: the brought model" in proc.stderr
    assert doc["reference_check"]["scores"]["imagenet"] == 1.0 and doc["rows"][0]["metrics"]["accuracy"] == 0.5


@pytest.mark.slow  # a pipeline run, promoted and deployed, then served from the registry
def test_optimize_in_python_then_serve_the_registered_model(shapes_model, tmp_path):
    from edgeopt.config import state_dir
    from edgeopt.serve.app import deploy_folder_for
    from edgeopt.serve.store import load_bundle

    model, data = shapes_model
    result = edgeopt.optimize(model, data, output=tmp_path / "out", formats=["onnx"], precisions=["fp32"],
                              deploy=True, name="shapes-api", overrides=FAST[1::2])
    _check_output(tmp_path / "out", result.to_json())
    assert result.files["model"].is_file() and result.winner in result.table
    assert result.report["promotion"]["promoted"] and result.config["deploy"]["enabled"]
    # the store the run logged to (the embedded one, or the active stack's MLflow tracker an earlier test left)
    used = result.report["tracking_uri"] or f"sqlite:///{state_dir() / 'mlflow.db'}"
    root = deploy_folder_for("models:/edgeopt-shapes-api@champion", used,
                             tmp_path / "serve")
    served = load_bundle(root, "current")
    assert served.labels == ["circle", "square", "triangle"] and served.bundle.manifest["variant"] == result.winner


@pytest.mark.slow  # a wheel, a venv and a pipeline run outside the checkout
def test_optimize_from_the_installed_wheel(shapes_model, wheel_venv, tmp_path):
    model, data = shapes_model
    wheel = next((wheel_venv.parent / "dist").glob("edgeopt-*.whl"))
    # the fixture installs with --target (no console script): install it as a user would, `edgeopt` in bin/
    _sh(sys.executable, "-m", "pip", "--python", wheel_venv / "bin" / "python", "install", "--no-deps", "--no-index",
        "--force-reinstall", "-q", wheel)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("ZENML_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "xdg"), EDGEOPT_STATE_DIR=str(tmp_path / "state"),
               ZENML_ANALYTICS_OPT_IN="false")
    edgeopt_cmd = wheel_venv / "bin" / "edgeopt"
    assert _sh(edgeopt_cmd, "--version", env=env, cwd=tmp_path).stdout.strip() == f"edgeopt {edgeopt.__version__}"
    proc = _sh(edgeopt_cmd, "optimize", model, "--data", data, "--output", "out", "--formats", "onnx",
               "--precisions", "fp32", "--json", *FAST, env=env, cwd=tmp_path)
    _check_output(tmp_path / "out", json.loads(proc.stdout))
    where = _sh(wheel_venv / "bin" / "python", "-c", "import edgeopt_zenml.api as a; print(a.__file__)", env=env,
                cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(wheel_venv)
    assert (tmp_path / "state" / "zenml").is_dir()  # no ZenML of the user's: the embedded store, in the state dir

