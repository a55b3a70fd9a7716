"""The documentation: the MkDocs site (mkdocs.yml, docs/) builds in strict mode, and the examples of README.md
and docs/*.md run, so that an example that no longer runs fails CI.

Every fenced bash/sh/python/yaml block carries a marker on the line before it (an HTML comment, invisible on
the page; docs/tests.md has the table):

    <!-- docs-test: run -->                              run it (bash, python) or check it as a whole config (yaml)
    <!-- docs-test: run over configs/default.yaml -->    yaml: a fragment, merged over that config, then checked
    <!-- docs-test: covered-by tests/x.py::test_y -->   an expensive example that test runs (it must exist)
    <!-- docs-test: skip <reason> -->                    shown, not run; the reason is required

A block without one fails :func:`test_every_example_is_marked`.
"""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import yaml

from edgeopt.plan import load_config
from edgeopt.plan.variants import variant_plan
from tests._tiny import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CHECKED = {"bash", "sh", "python", "yaml"}  # the languages whose blocks need a marker
MARKER = re.compile(r"^<!-- docs-test: (?P<what>.*?) -->\s*$")
FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)\s*$")
# the files a config example may name, made in the folder it is checked from (relative paths are relative to it)
WORKSPACE_FILES = {"model.onnx": b"", "model.pt": b"", "labels.txt": b"circle\nsquare\ntriangle\n", "ca.pem": b""}


@dataclass(frozen=True)
class Block:
    page: str  # README.md, docs/serving.md ...
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: Optional[str]  # what follows "docs-test:", None when unmarked

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def kind(self) -> str:
        return (self.marker or "").split(" ", 1)[0]

    @property
    def argument(self) -> str:
        return (self.marker or "").split(" ", 1)[1].strip() if " " in (self.marker or "") else ""


def blocks(text: str, page: str) -> List[Block]:
    """The fenced blocks of a markdown text, each with the marker on the line before it (blank lines between
    allowed; any other line in between unmarks it)."""
    lines, out = text.splitlines(), []
    marker: Optional[str] = None
    i = 0
    while i < len(lines):
        m, f = MARKER.match(lines[i]), FENCE.match(lines[i])
        if m:
            marker = m.group("what").strip()
        elif f:
            fence = f.group("fence")
            end = next((j for j in range(i + 1, len(lines))
                        if lines[j].strip().startswith(fence) and set(lines[j].strip()) == {fence[0]}), None)
            if end is None:
                raise AssertionError(f"{page}:{i + 1}: a fenced block that is never closed")
            out.append(Block(page, i + 1, f.group("lang").lower(), "\n".join(lines[i + 1:end]) + "\n", marker))
            marker, i = None, end
        elif lines[i].strip():
            marker = None
        i += 1
    return out


def all_blocks() -> List[Block]:
    return [b for p in PAGES for b in blocks(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]


def problem(block: Block) -> Optional[str]:
    """Why a block's marker is wrong or missing; None when it is right."""
    if block.lang not in CHECKED:
        return None if block.marker is None else "a marker on a block of no checked language"
    if block.marker is None:
        return "no docs-test marker: run it, or say which test covers it or why it is skipped"
    if block.kind == "run":
        over = block.argument
        if over and (block.lang != "yaml" or not over.startswith("over ") or not (ROOT / over[5:]).is_file()):
            return f"'run {over}': 'over <config file>' is for yaml fragments, and the file must exist"
        return None
    if block.kind == "covered-by":
        path, _, test = block.argument.partition("::")
        if not test or not (ROOT / path).is_file():
            return f"covered-by {block.argument!r}: expected tests/<file>.py::<test> of an existing file"
        if not re.search(rf"^def {re.escape(test)}\(", (ROOT / path).read_text(), re.M):
            return f"covered-by {block.argument!r}: {path} has no {test}"
        return None
    if block.kind == "skip":
        return None if block.argument else "skip needs a reason"
    return f"unknown marker {block.marker!r} (run, run over <config>, covered-by <test>, skip <reason>)"


BLOCKS = all_blocks()
RUN = [b for b in BLOCKS if b.kind == "run"]
CONFIGS = [b for b in RUN if b.lang == "yaml"]
COMMANDS = [b for b in RUN if b.lang in ("bash", "sh", "python")]


def test_the_site_builds_strictly(tmp_path, caplog):
    """``mkdocs build --strict``: a warning (a link or anchor that does not exist, a page left out of the nav)
    fails the build."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config as mkdocs_config
    from mkdocs.exceptions import Abort

    cfg = mkdocs_config(str(ROOT / "mkdocs.yml"), strict=True, site_dir=str(tmp_path / "site"))
    try:
        build(cfg)
    except Abort as err:
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        pytest.fail(f"{err}:\n" + "\n".join(warnings))
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")}
    built = {p.parent.name for p in (tmp_path / "site").glob("*/index.html")} | {"index"}
    assert pages <= built, f"not built: {sorted(pages - built)}"


def test_every_example_is_marked():
    assert len(RUN) >= 10 and CONFIGS and COMMANDS  # the collection itself works
    wrong = [f"{b.id}: {why}" for b in BLOCKS if (why := problem(b))]
    assert not wrong, "\n".join(wrong)


def test_the_readme_links_into_the_docs():
    """README.md is not part of the site (mkdocs checks the site's links): its relative links and their anchors
    are checked here, with the slugs both GitHub and MkDocs give a heading."""
    from markdown.extensions.toc import slugify

    links = re.findall(r"\]\(((?!https?://)[^)#\s]+)(?:#([^)\s]+))?\)", (ROOT / "README.md").read_text())
    assert links
    wrong = []
    for target, fragment in links:
        path = ROOT / target
        if not path.exists():
            wrong.append(f"{target}: no such file")
        elif fragment:
            headings = re.findall(r"^#+\s+(.+?)\s*$", path.read_text(), re.M)
            if fragment not in {slugify(h, "-") for h in headings}:
                wrong.append(f"{target}#{fragment}: no such heading")
    assert not wrong, "\n".join(wrong)


def test_the_marker_rules_catch_an_unmarked_or_wrong_block():
    text = ("<!-- docs-test: run -->\n```bash\nedgeopt --help\n```\n\n```python\nimport edgeopt\n```\n"
            "<!-- docs-test: skip -->\n\n```yaml\na: 1\n```\n<!-- docs-test: run -->\nsome text\n```bash\nx\n```\n"
            "<!-- docs-test: covered-by tests/test_docs.py::test_no_such_test -->\n```bash\nx\n```\n")
    found = blocks(text, "t.md")
    assert [b.marker for b in found] == ["run", None, "skip", None, "covered-by tests/test_docs.py::test_no_such_test"]
    assert [problem(b) is None for b in found] == [True, False, False, False, False]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder for config examples: imgs/ (examples/shapes) and the files WORKSPACE_FILES names."""
    ws = tmp_path_factory.mktemp("docs-configs")
    shutil.copytree(ROOT / "examples" / "shapes", ws / "imgs")
    for name, data in WORKSPACE_FILES.items():
        (ws / name).write_bytes(data)
    return ws


def _merged(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.mark.parametrize("block", CONFIGS, ids=lambda b: b.id)
def test_config_examples_are_valid_configs(block, workspace):
    raw = yaml.safe_load(block.code)
    assert isinstance(raw, dict), f"{block.id}: not a YAML mapping"
    if block.argument.startswith("over "):
        raw = _merged(yaml.safe_load((ROOT / block.argument[5:]).read_text()), raw)
    path = workspace / f"{block.id.replace('/', '_').replace(':', '_')}.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)  # ConfigError: the field and what is wrong, in one line
    assert variant_plan(cfg).names()


def run_block(block: Block, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    """A bash or python example in a fresh process, ``edgeopt`` and ``python`` from this interpreter's
    environment (the conftest's state folder inherited)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    argv = (["bash", "-euo", "pipefail", "-c", block.code] if block.lang in ("bash", "sh")
            else [sys.executable, "-c", block.code])
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # spawns interpreters (each example a second or two)
@pytest.mark.parametrize("block", COMMANDS, ids=lambda b: b.id)
def test_command_and_python_examples_run(block):
    done = run_block(block)
    assert done.returncode == 0, (f"{block.id}: the example exits {done.returncode}:\n{block.code}\n"
                                  f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")


@pytest.mark.slow  # spawns an interpreter
def test_a_broken_example_fails():
    broken = Block("t.md", 1, "bash", "edgeopt --help >/dev/null\nedgeopt validate --no-such-option\n", "run")
    assert run_block(broken).returncode == 2
