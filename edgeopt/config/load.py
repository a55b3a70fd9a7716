"""Reading a run config: a bounded YAML file, validated against the schema, every problem one line.

A bad file fails fast with one line naming the field's path and what was expected, e.g.::

    configs/bad.yaml: target.constraints.max_latency_ms: Input should be greater than 0 (got -3)
"""

from __future__ import annotations

import copy
import reprlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from pydantic import ValidationError

from edgeopt.config.schema import RunConfig

# Bounds of what a config file may be: a run config is a few kilobytes of YAML.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_NODES = 100_000
MAX_ERROR_CHARS = 500


class ConfigError(ValueError):
    """A configuration problem, already phrased as one line for the user."""


_SHOWN = reprlib.Repr()  # a bounded repr of the bad value: a list or string of any size shows as a few items
_SHOWN.maxlevel, _SHOWN.maxdict, _SHOWN.maxlist, _SHOWN.maxtuple = 2, 4, 4, 4
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 60, 60, 40


def _clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_error(source: str, err: ValidationError) -> str:
    """One line: the first error's field path, what was expected and a bounded view of what was given."""
    e = err.errors(include_url=False, include_context=False, include_input=True)[0]
    path = ".".join(str(p) for p in e["loc"]) or "(top level)"
    msg = _clip(e["msg"].removeprefix("Value error, ").splitlines()[0], 300)
    if e["type"] == "extra_forbidden":
        msg = "unknown field"
    section = isinstance(e.get("input"), dict)  # a rule across a section's fields: its message names them
    shown = "" if section or e["type"] in ("missing", "extra_forbidden") else f" (got {_SHOWN.repr(e.get('input'))})"
    where = "" if section and (path == "(top level)" or msg.startswith(f"{path}.")) else f"{path}: "
    more = f" [+{err.error_count() - 1} more]" if err.error_count() > 1 else ""
    return _clip(f"{source}: {where}{msg}{shown}") + more


def validate_config(raw: Any, source: str = "config", context: Optional[Dict[str, Any]] = None) -> RunConfig:
    """``raw`` validated against the schema (``context``: the registry checks, see ``edgeopt.plan.check``)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw, context=context)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def apply_overrides(raw: Any, overrides: Sequence[str], source: str = "--set") -> Any:
    """``raw`` with each ``key.path=value`` of ``overrides`` set in it (the command line's ``--set``): the value
    is read as YAML (``0.5``, ``true``, ``null``, ``[onnx, openvino]``, ``{prune: {amounts: [0.3]}}``), the
    dotted path names mapping keys, or a list index (``targets.0.url``); missing mappings are made. The
    result is validated like the file; a malformed override is a one-line ConfigError."""
    if not overrides:
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config is not a mapping")
    out = copy.deepcopy(raw)
    for item in overrides:
        key, eq, text = item.partition("=")
        keys = [k.strip() for k in key.split(".")]
        if not eq or not all(keys):
            raise ConfigError(f"{source} {item!r}: expected key.path=value, e.g. target.threads=2")
        try:
            value = yaml.load(text, Loader=_Loader) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"{source} {key}: not a YAML value ({_clip(str(err).splitlines()[0], 120)})") from None
        node: Any = out
        for depth, k in enumerate(keys):
            last = depth == len(keys) - 1
            if isinstance(node, list):
                if not k.isdigit() or int(k) >= len(node):
                    raise ConfigError(f"{source} {key}: {'.'.join(keys[:depth]) or 'the config'} is a list of "
                                      f"{len(node)}; {k!r} is not an index in it")
                if last:
                    node[int(k)] = value
                else:
                    node = node[int(k)]
            elif isinstance(node, dict):
                if last:
                    node[k] = value
                else:
                    if node.get(k) is None:
                        node[k] = {}
                    node = node[k]
            else:
                raise ConfigError(f"{source} {key}: {'.'.join(keys[:depth])} is {type(node).__name__}, not a mapping")
    return out


def read_config_text(path: Path) -> str:
    """The config file's text: a readable UTF-8 text file of at most MAX_CONFIG_BYTES, else ConfigError."""
    try:
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder, not a config file")
        if path.exists() and not path.is_file():
            raise ConfigError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config ({err.strerror or type(err).__name__})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB: not a run config")
    if b"\0" in data:
        raise ConfigError(f"{path}: a binary file, not a YAML config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}): not a YAML config") from None


# libyaml's parser (in PyYAML's wheels): ten times faster than the pure-Python one, and it refuses
# nesting beyond 1000 levels by itself.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_shape(node: yaml.Node, source: str) -> None:
    """Refuse YAML that nests deeper than MAX_CONFIG_DEPTH or expands (through aliases) to more than
    MAX_CONFIG_NODES values, before anything is built from it: an alias bomb of a few hundred bytes
    stands for billions of values. Sizes are memoized per node, so a bomb costs its own size to measure."""
    measured: Dict[int, Tuple[int, int]] = {}

    def measure(n: yaml.Node) -> Tuple[int, int]:
        if id(n) not in measured:
            parts = [measure(c) for c in _children(n)]
            size, depth = 1 + sum(p[0] for p in parts), 1 + max((p[1] for p in parts), default=0)
            if depth > MAX_CONFIG_DEPTH:
                raise ConfigError(f"{source}: nested deeper than {MAX_CONFIG_DEPTH} levels: not a run config")
            if size > MAX_CONFIG_NODES:
                raise ConfigError(f"{source}: expands to more than {MAX_CONFIG_NODES} values (YAML aliases): "
                                  "not a run config")
            measured[id(n)] = (size, depth)
        return measured[id(n)]

    measure(node)


def _children(n: yaml.Node) -> List[yaml.Node]:
    if isinstance(n, yaml.SequenceNode):
        return list(n.value)
    if isinstance(n, yaml.MappingNode):
        return [x for pair in n.value for x in pair]
    return []


def read_config(path: str | Path) -> Any:
    """The YAML document of a run config file, read within the bounds above; every problem is a one-line
    ConfigError."""
    path = Path(path)
    text = read_config_text(path)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(f"{path}: empty config")
        _check_shape(node, str(path))
        raw = loader.construct_document(node)
    except RecursionError:  # deeper than Python's stack: far beyond MAX_CONFIG_DEPTH
        raise ConfigError(f"{path}: nested deeper than {MAX_CONFIG_DEPTH} levels: not a run config") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = _clip(str(getattr(err, "problem", None) or err).splitlines()[0], 120)
        if "nesting depth" in problem:  # libyaml's own limit
            raise ConfigError(f"{path}: nested deeper than {MAX_CONFIG_DEPTH} levels: not a run config") from None
        raise ConfigError(f"{path}:{where}: not valid YAML ({problem})") from None
    finally:
        loader.dispose()
    return raw

