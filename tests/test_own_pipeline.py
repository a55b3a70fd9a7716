"""A ZenML project of a user's own (examples/own_pipeline: its own `steps` and `pipelines` packages)
calling edgeopt's steps, run from outside the checkout against edgeopt installed as a built wheel in
a separate virtual environment (which reuses this venv's dependencies, so torch is not installed
twice). Its own `steps` and edgeopt's must not collide, and ZenML must resolve edgeopt's steps from
the installed package."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import uuid
from pathlib import Path

import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient
from zenml.client import Client
from zenml.config.source import SourceType

from edgeopt.config import PROJECT_ROOT

pytestmark = pytest.mark.slow  # a wheel, a venv and a pipeline run (docs/tests.md: the inner loop skips them)

EXAMPLE = PROJECT_ROOT / "examples" / "own_pipeline"


def _sh(*cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A venv with edgeopt's wheel installed and this venv's site-packages (not its editable edgeopt) behind it."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # build from a copy: an in-tree build would leave build/ in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(PROJECT_ROOT / name, src / name)
    for pkg in ("edgeopt", "edgeopt_zenml"):
        shutil.copytree(PROJECT_ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    _sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src)
    wheel = next((tmp / "dist").glob("edgeopt-*.whl"))
    venv = tmp / "venv"
    _sh(sys.executable, "-m", "venv", "--without-pip", venv)
    site = Path(_sh(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
                .stdout.strip())
    # this venv's packages, less its editable edgeopt (a second "edgeopt" distribution would make ZenML's
    # source resolution ambiguous), behind a .pth line (which only adds a folder to sys.path)
    deps = tmp / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(("edgeopt", "__editable__")):
            (deps / entry.name).symlink_to(entry)
    (site / "project-deps.pth").write_text(f"{deps}\n")
    _sh(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", site, wheel)
    return venv


@pytest.fixture(scope="module")
def own_run(wheel_venv, tmp_path_factory, state_dir):
    project = tmp_path_factory.mktemp("user") / "own_pipeline"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("__pycache__", ".state"))
    state, run_name = project / ".state", f"own-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["EDGEOPT_STATE_DIR"] = str(state_dir / "own-pipeline")
    where = _sh(wheel_venv / "bin" / "python", "-c",
                "import json, edgeopt_zenml.steps, steps; print(json.dumps([edgeopt_zenml.steps.__file__, steps.__file__]))",
                cwd=project, env=env)
    proc = _sh(wheel_venv / "bin" / "python", "run.py", "--state", state, "--run-name", run_name, "--epochs", "3",
               cwd=project, env=env)
    return {"run": Client().get_pipeline_run(run_name), "state": state, "project": project,
            "where": json.loads(where.stdout), "output": proc.stdout + proc.stderr}


def test_the_users_steps_and_edgeopts_come_from_their_own_places(own_run, wheel_venv):
    edgeopt_steps, own_steps = map(Path, own_run["where"])
    assert edgeopt_steps.is_relative_to(wheel_venv) and not edgeopt_steps.is_relative_to(PROJECT_ROOT)
    assert own_steps == own_run["project"] / "steps" / "__init__.py"
    steps = own_run["run"].steps
    own = steps["train_classifier"].spec.source
    assert (own.module, own.type) == ("steps.train", SourceType.USER)
    for name in ("load_data", "export", "quantize", "evaluate", "select", "track", "promote", "deploy"):
        source = steps[name].spec.source
        assert source.module.startswith("edgeopt_zenml.steps.") and source.type == SourceType.DISTRIBUTION_PACKAGE, \
            (name, source)
        assert source.package_name == "edgeopt", source


def test_the_users_pipeline_promotes_tracks_and_deploys(own_run):
    state = own_run["state"]
    uri = f"sqlite:///{state / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    champion = client.get_model_version_by_alias("own-digits", "champion")
    experiment = client.get_experiment_by_name("own-pipeline").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment], "tags.`edgeopt.role` = 'variant'")}
    assert set(runs) == {"teacher-fp32-onnx@onnxruntime", "teacher-int8-onnx@onnxruntime"}
    assert all(r.data.metrics["accuracy"] > 0.8 for r in runs.values()), {n: r.data.metrics for n, r in runs.items()}
    models = client.search_logged_models([experiment])
    assert sorted(m.name for m in models) == sorted(runs) and all(m.status == LoggedModelStatus.READY for m in models)
    manifest = json.loads((state / "deploy" / "current" / "manifest.json").read_text())
    assert (manifest["registered_model"], manifest["version"]) == ("own-digits", str(champion.version))
    assert manifest["variant"] in runs
