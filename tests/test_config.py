import os
import subprocess
import sys

import pytest

from edgeopt.config import ConfigError
from edgeopt.plan import load_config, parse_config
from edgeopt.plan.variants import variant_plan
from tests._tiny import ROOT, TINY


@pytest.mark.parametrize("name", ["default.yaml", "imagefolder.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / name)
    assert variant_plan(cfg).names()


def _with(path: str, value):
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    node = raw
    keys = path.split(".")
    for k in keys[:-1]:
        node[k] = dict(node.get(k, {}))
        node = node[k]
    node[keys[-1]] = value
    return raw


@pytest.mark.parametrize("path,value,expect", [
    ("target.constraints.max_latency_ms", -3, "target.constraints.max_latency_ms"),
    ("teacher.arch", "resnet9000", "teacher.arch: unknown architecture 'resnet9000'"),
    ("teacher.archh", "x", "teacher.archh: unknown field"),
    ("variants.shrink", {"prune": {"amounts": [0.5, 1.5]}}, "variants.shrink: prune.amounts.1: Input should be less"),
    ("variants.shrink", {"prune": {"amounts": [0.5], "importance": "x"}}, "variants.shrink: prune.importance: Input"),
    ("variants.shrink", {"quantum": {"amounts": [0.5]}}, "variants.shrink: unknown technique 'quantum'"),
    ("variants.bases", ["teacher", "student", "teacher"], "variants.bases: duplicate entries"),
    ("variants.quantization", ["int4"], "variants.quantization.0"),
    ("variants.formats", ["openvino"], "no variant of the student: no format in ['openvino'] runs on a runtime"),
    ("target.threads", 0, "target.threads"),
    ("data.source", "imagefolder", "data.root is required"),
    ("data.root", "no/such/folder", "data.root: folder not found: no/such/folder"),
    ("tracking.uri", "file:./mlruns", "tracking.uri: MLflow 3 refuses file stores"),
    ("registry.name", "bad name!", "registry.name"),
    ("selection.objective", "vibes", "selection.objective"),
])
def test_bad_config_names_the_field(path, value, expect):
    raw = _with(path, value)
    if path == "variants.formats":
        raw["variants"]["runtimes"] = ["onnxruntime"]
    if path == "data.root":
        raw["data"]["source"] = "imagefolder"
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "bad.yaml")
    msg = str(err.value)
    assert msg.startswith("bad.yaml: ") and "\n" not in msg
    assert expect in msg


def test_missing_section_and_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="bad.yaml: teacher: Field required"):
        parse_config({k: v for k, v in TINY.items() if k != "teacher"}, "bad.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml:.*not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


CLI_THEN_SHOW_IMPORTS = """
import sys
from edgeopt_zenml.cli import cli
try:
    cli(sys.argv[1:])
finally:
    print(sorted(m for m in ("torch", "zenml", "mlflow", "onnxruntime", "openvino") if m in sys.modules))
"""


@pytest.mark.parametrize("command", ["run", "validate"])
def test_cli_rejects_bad_config_in_one_line_before_importing_anything_heavy(tmp_path, command):
    """Fast by construction, not by a clock: the command ends before torch, ZenML or MLflow is imported."""
    text = (ROOT / "configs" / "default.yaml").read_text()
    assert "threads: 1" in text  # else the run below would be a real one
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("threads: 1", "threads: -2"))
    out = subprocess.run([sys.executable, "-c", CLI_THEN_SHOW_IMPORTS, command, "-c", str(bad)], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"edgeopt: error: {bad}: target.threads: Input should be greater than or equal to 1 (got -2)"]
    assert out.stdout.strip() == "[]", f"imported before refusing the config: {out.stdout}"


def test_cli_help_lists_every_command():
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    commands = out.stdout.split("Commands:")[1].split()
    for command in ("run", "validate", "serve", "rollback"):
        assert command in commands, out.stdout
    assert "Pareto" in out.stdout


def test_cli_validate_lists_the_variants():
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "validate", "-c", str(ROOT / "configs" / "default.yaml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert f"ok ({len(variant_plan(cfg).names())} variants of student; reference teacher-fp32-onnx" in out.stdout
    assert "p50-int8-openvino@openvino" in out.stdout


def test_quality_gate_exit_codes():
    from edgeopt_zenml.cli import gate_exit_code

    assert gate_exit_code("student-int8-onnx@onnxruntime", require_promotion=True) == 0  # promoted, or champion kept
    assert gate_exit_code(None, require_promotion=True) == 3  # no variant met the constraints
    assert gate_exit_code(None, require_promotion=False) == 0  # no gate asked for
