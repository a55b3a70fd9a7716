"""A config checked against the registries: the precisions, formats, runtimes and techniques it names
exist, each technique's options fit that technique's schema, and the plan has a variant of every base.

The schema (``edgeopt.config``) is plain data; this module passes :class:`Registries` to its validation
as the pydantic context, so every problem is reported like a schema error, one line naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from edgeopt import formats, precisions
from edgeopt.config import RunConfig, read_config, validate_config
from edgeopt.config.load import apply_overrides
from edgeopt.config.schema import SearchRange
from edgeopt.measure.latency import cpu_info
from edgeopt.plan.variants import variant_plan
from edgeopt.runtimes import RUNTIMES
from edgeopt.shrink.base import TechniqueOptions, parse_options


class Registries:
    """What the schema's validators ask when this module validates a config; each raises ValueError."""

    def precision(self, name: str) -> None:
        """Known, and where it computes in a precision of the CPU's own (bf16, fp16-native), this
        CPU has one of the flags it needs (``Precision.cpu_flags``)."""
        if name == precisions.IDENTITY:
            return
        needs = precisions.get(name).cpu_flags
        if not needs:
            return
        model, flags = cpu_info()
        if not flags & set(needs):
            has = {1: "lacks it", 2: "has neither"}.get(len(needs), "has none of them")
            why = f"this CPU ({model}) {has}" if flags else "this CPU's flags cannot be read (/proc/cpuinfo)"
            raise ValueError(f"{name} needs a CPU with {' or '.join(needs)}; {why}")

    def native_precisions(self) -> List[str]:
        """What ``native`` in variants.quantization stands for on this CPU (none where it has no flag)."""
        return precisions.natives(cpu_info()[1])

    def formats(self, names: List[str]) -> None:
        for f in names:
            formats.get(f)

    def runtimes(self, names: List[str]) -> None:
        unknown = [r for r in names if r not in RUNTIMES]
        if unknown:
            raise ValueError(f"unknown runtime {unknown[0]!r}; expected one of {', '.join(RUNTIMES)}")

    def techniques(self, raw: Dict[str, Any]) -> Dict[str, TechniqueOptions]:
        return parse_options(raw)

    def search_space(self, raw: Dict[str, Any]) -> Dict[str, SearchRange]:
        """``variants.search.shrink``: each technique's range, step and choices, and its options checked
        against its schema (every value of every choice too)."""
        from pydantic import ValidationError

        out = {}
        for name, section in raw.items():
            if isinstance(section, SearchRange):
                out[name] = section
                continue
            if not isinstance(section, dict):
                raise ValueError(f"{name}: expected a mapping {{range: [lo, hi], ...}}")
            if "amounts" in section:
                raise ValueError(f"{name}.amounts: a search takes a range: [lo, hi] (a grid's amounts go under "
                                 f"variants.shrink, and start the search with start_from_grid)")
            own = {k: section[k] for k in SearchRange.model_fields if k in section and k != "options"}
            rest = {k: v for k, v in section.items() if k not in own}
            if set(rest) == {"options"} and isinstance(rest["options"], dict):  # a config dumped after checking
                rest = {k: v for k, v in rest["options"].items() if k != "amounts"}
            try:
                space = SearchRange.model_validate(own)
            except ValidationError as err:
                e = err.errors()[0]
                where = ".".join(str(p) for p in (name, *e["loc"]))
                raise ValueError(f"{where}: {e['msg'].removeprefix('Value error, ')}") from None
            lo = space.range[0]
            opts = parse_options({name: {**rest, "amounts": [lo]}})[name]
            for option, values in space.choices.items():
                if option == "amounts" or option not in type(opts).model_fields:
                    raise ValueError(f"{name}.choices.{option}: not an option of {name}")
                for value in values:
                    parse_options({name: {**rest, option: value, "amounts": [lo]}})
            out[name] = space.model_copy(update={"options": opts})
        return out

    def plan(self, cfg: RunConfig) -> None:
        plan = variant_plan(cfg)
        missing = [b for b in cfg.variants.bases if not any(x.shrink.base == b for x in plan.builds)]
        if missing:
            v = cfg.variants
            raise ValueError(
                f"no variant of the {missing[0]}: no format in {v.formats} runs on a runtime in {v.runtimes} with a "
                f"precision in {v.quantization} ({'; '.join(_readers(f) for f in v.formats)})"
            )


def _readers(fmt: str) -> str:
    """What can make a variant of ``fmt``, e.g. 'openvino runs on openvino, with fp32, fp16, int8, ...'."""
    kinds = [p for p in precisions.names() if fmt in precisions.formats_for(p)]
    return f"{fmt} runs on {'/'.join(formats.get(fmt).runtimes)}, with {', '.join(kinds)}"


CONTEXT = {"registries": Registries()}


def parse_config(raw: Any, source: str = "config", config_dir: Optional[Path] = None) -> RunConfig:
    """A config mapping validated against the schema and the registries; every problem is a one-line
    ConfigError. ``config_dir``: the folder its relative paths are relative to (a config file's own folder;
    default: the project root)."""
    return validate_config(raw, source, CONTEXT if config_dir is None else {**CONTEXT, "config_dir": config_dir})


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read, check and validate a run config file, its relative paths relative to its own folder, with the
    command line's ``--set key.path=value`` overrides applied; every problem is a one-line ConfigError."""
    raw = apply_overrides(read_config(path), overrides)
    return parse_config(raw, str(path), config_dir=Path(path).expanduser().absolute().parent)
