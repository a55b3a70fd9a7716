"""The architecture holds: light imports where they matter, no format switch outside the format
modules, the ZenML side kept out of the domain core, no import cycle (among modules or among the core's
packages, deferred imports included), no module a newcomer gets lost in."""

import ast
import re
import subprocess
import sys
from collections import Counter
from graphlib import CycleError, TopologicalSorter

import pytest

from tests._tiny import ROOT

CORE = ROOT / "edgeopt"
PACKAGES = ("edgeopt", "edgeopt_zenml")
MAX_MODULE_LINES = 450


def _module_name(path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _import_graph() -> dict:
    """module -> the project modules it imports anywhere in its body (deferred imports too): ``import a.b``
    and ``from a import b`` name the module a.b where it exists, else the package a."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}

    def known(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {known(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here
                    for _ in range(node.level - 1):
                        parent = parent.rpartition(".")[0]
                    base = f"{parent}.{base}".rstrip(".")
                deps |= {known(f"{base}.{a.name}") for a in node.names}
        graph[name] = deps - {"", name}
    return graph


def _cycle(graph: dict):
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as err:
        return err.args[1]
    return None


def test_no_import_cycle_among_modules():
    assert _cycle(_import_graph()) is None


def test_no_import_cycle_among_the_core_packages():
    """Each stage of the core (edgeopt.data, edgeopt.shrink, edgeopt.deploy, ...) depends on earlier ones only."""
    packages: dict = {}
    for module, deps in _import_graph().items():
        if module.startswith("edgeopt."):
            own = ".".join(module.split(".")[:2])
            packages.setdefault(own, set()).update(
                ".".join(d.split(".")[:2]) for d in deps if d.startswith("edgeopt.") and not d.startswith(own + "."))
            packages[own].discard(own)
    assert _cycle(packages) is None


def test_the_cycle_check_sees_deferred_imports(tmp_path):
    """The graph above is not vacuous: a deferred import back into a module that imports it is a cycle."""
    graph = _import_graph()
    assert "edgeopt.plan.variants" in graph["edgeopt.plan.check"]
    assert _cycle({**graph, "edgeopt.config.schema": graph["edgeopt.config.schema"] | {"edgeopt.plan.check"}})


def test_no_module_is_too_long():
    long = {_module_name(p): n for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_one_module_per_concept_name():
    """No two core modules share a name (a `prune.py` here and a `prune.py` there): a newcomer opens the one.
    The one pair allowed: OpenVINO is both a format (IR files) and a runtime, each registry with its module."""
    names = Counter(p.stem for p in CORE.rglob("*.py") if p.stem not in ("__init__", "__main__", "base"))
    assert [n for n, c in names.items() if c > 1] == ["openvino"]


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
