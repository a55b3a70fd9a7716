import subprocess
import sys
import time

import pytest

from edgeopt.config import ConfigError, load_config, parse_config
from edgeopt.plan import variant_plan
from tests.conftest import ROOT, TINY


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


def test_cli_rejects_bad_config_fast_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs" / "default.yaml").read_text().replace("threads: 1", "threads: -2"))
    t = time.perf_counter()
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "run", "-c", str(bad)],
                         capture_output=True, text=True, cwd=tmp_path)
    elapsed = time.perf_counter() - t
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "target.threads" in lines[0] and "Traceback" not in out.stderr
    assert elapsed < 5, f"config rejection took {elapsed:.1f}s"


def test_cli_help_explains_commands():
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for word in ("run", "validate", "Pareto"):
        assert word in out.stdout


def test_cli_validate_lists_the_variants():
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "validate", "-c", str(ROOT / "configs" / "default.yaml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert f"ok ({len(variant_plan(cfg).names())} variants of student; reference teacher-fp32-onnx" in out.stdout
    assert "p50-int8-openvino@openvino" in out.stdout
