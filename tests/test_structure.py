"""The architecture holds: light imports where they matter, no format switch outside the format
modules, the ZenML side kept out of the domain core, no import cycle."""

import ast
import re
import subprocess
import sys

import pytest

from tests._tiny import ROOT

CORE = ROOT / "edgeopt"


def _imports_after(statement: str) -> set:
    code = f"import sys; {statement}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_the_server_never_imports_torch():
    loaded = _imports_after("import edgeopt.serve.app, edgeopt.runtimes.onnxruntime, edgeopt.runtimes.openvino")
    assert "torch" not in loaded and "onnxruntime" in loaded


def test_validating_a_config_imports_no_heavy_library():
    loaded = _imports_after("from edgeopt.plan import load_config, variant_plan; "
                            f"variant_plan(load_config({str(ROOT / 'configs/default.yaml')!r}))")
    assert not loaded & {"torch", "onnx", "onnxruntime", "openvino", "nncf", "zenml", "mlflow"}


def test_the_domain_core_imports_no_zenml():
    for path in CORE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(n.split(".")[0] == "zenml" for n in names), path


FORMAT_SWITCH = re.compile(r"""(==|!=)\s*["'](onnx|openvino)["']|["'](onnx|openvino)["']\s*(==|!=)""")


def test_no_format_switch_outside_the_format_modules():
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in [*CORE.rglob("*.py"), *(ROOT / "edgeopt_zenml").rglob("*.py")]
                 if "formats" not in p.parts
                 for i, line in enumerate(p.read_text().splitlines(), 1) if FORMAT_SWITCH.search(line)]
    assert not offenders, offenders


@pytest.mark.slow  # one interpreter per module, ~50 of them
@pytest.mark.parametrize("module", sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in CORE.rglob("*.py")))
def test_every_core_module_imports_on_its_own(module):
    """Importing any module first (in a fresh interpreter) works: no import cycle hides behind an order."""
    _imports_after(f"import {module}")


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_")))
def test_every_bench_script_starts(script):
    """Each benchmark at least parses its options (imports and shared helpers included): a refactor of
    bench/_common.py that breaks a script shows here, not in the next benchmark run."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr[-2000:]
