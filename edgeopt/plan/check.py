"""A config checked against the registries: the precisions, formats, runtimes and techniques it names
exist, each technique's options fit that technique's schema, and the plan has a variant of every base.

The schema (``edgeopt.config``) is plain data; this module passes :class:`Registries` to its validation
as the pydantic context, so every problem is reported like a schema error, one line naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from edgeopt import formats, precisions
from edgeopt.config import RunConfig, read_config, validate_config
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

    def formats(self, names: List[str]) -> None:
        for f in names:
            formats.get(f)

    def runtimes(self, names: List[str]) -> None:
        unknown = [r for r in names if r not in RUNTIMES]
        if unknown:
            raise ValueError(f"unknown runtime {unknown[0]!r}; expected one of {', '.join(RUNTIMES)}")

    def techniques(self, raw: Dict[str, Any]) -> Dict[str, TechniqueOptions]:
        return parse_options(raw)

    def plan(self, cfg: RunConfig) -> None:
        plan = variant_plan(cfg)
        missing = [b for b in cfg.variants.bases if not any(x.shrink.base == b for x in plan.builds)]
        if missing:
            v = cfg.variants
            raise ValueError(
                f"no variant of the {missing[0]}: no format in {v.formats} runs on a runtime in {v.runtimes} with a "
                f"precision in {v.quantization} (onnx runs on onnxruntime/openvino, openvino IR on openvino; "
                f"int8-dynamic is ONNX-only)"
            )


CONTEXT = {"registries": Registries()}


def parse_config(raw: Any, source: str = "config") -> RunConfig:
    """A config mapping validated against the schema and the registries; every problem is a one-line
    ConfigError."""
    return validate_config(raw, source, CONTEXT)


def load_config(path: str | Path) -> RunConfig:
    """Read, check and validate a run config file; every problem is a one-line ConfigError."""
    return parse_config(read_config(path), str(path))
