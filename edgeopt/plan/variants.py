"""The variant plan: every model a run builds and every (model, runtime) it measures, computed once.

base (teacher | student) x shrink (none, or a technique at an amount; a brought ONNX teacher is shrunk
  as its torch conversion, checked against the file when the shrink step runs; with ``variants.search``,
  the search's survivors instead of the grid's amounts: slots s1, s2 ... per base, filled at run time)
  x format (onnx | openvino) x precision (fp32 | fp16 | int8 ...) x runtime (those that read the format)

The pipeline wires its steps from it, ``edgeopt validate`` prints it, bench/ and the tests read it;
variant names and step ids are made here and nowhere else. Names read base-shrink-precision-format,
e.g. ``student-p50-int8-onnx``, ``teacher-int8-openvino``, ``teacher-fp32-onnx`` (the reference).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from edgeopt import formats, precisions
from edgeopt.config import RunConfig

REFERENCE_FORMAT, REFERENCE_PRECISION = "onnx", "fp32"


@dataclass(frozen=True)
class ShrinkSpec:
    """One torch or ONNX model to export: a base as it is, or a base shrunk by a technique."""

    base: str
    technique: Optional[str] = None
    amount: float = 0.0
    tag: str = ""  # p50, lr90, sp50; s1, s2 for the search's survivors; empty for the base itself
    slot: int = 0  # the search's n-th survivor of this base (technique and amount decided at run time); 0: none

    @property
    def searched(self) -> bool:
        return self.slot > 0

    @property
    def key(self) -> str:
        return f"{self.base}-{self.tag}" if self.tag else self.base

    @property
    def id(self) -> str:
        """The key as it goes into step ids: ``student_p50``."""
        return self.key.replace("-", "_")

    @property
    def step_id(self) -> str:
        return f"shrink_{self.id}"


@dataclass(frozen=True)
class BuildSpec:
    """One exported model: a shrink spec in a format at a precision, and the runtimes that measure it."""

    shrink: ShrinkSpec
    format: str
    precision: str
    runtimes: Tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.shrink.key}-{self.precision}-{self.format}"

    @property
    def fp32_name(self) -> str:
        return f"{self.shrink.key}-fp32-{self.format}"

    @property
    def export_id(self) -> str:
        return f"export_{self.shrink.id}_{self.format}"

    @property
    def quantize_id(self) -> str:
        return f"quantize_{self.shrink.id}_{self.format}_{self.precision.replace('-', '_')}"

    def evaluations(self) -> List[str]:
        return [f"{self.name}@{rt}" for rt in self.runtimes]


@dataclass
class Plan:
    shrinks: List[ShrinkSpec]
    builds: List[BuildSpec]
    reference: BuildSpec
    notes: List[str] = field(default_factory=list)
    search_workers: List[str] = field(default_factory=list)  # step ids of the search's workers

    @property
    def reference_name(self) -> str:
        """The brought (or trained) model in FP32 on the runtime that runs its ONNX file."""
        return f"{self.reference.name}@{formats.get(REFERENCE_FORMAT).native_runtime}"

    def evaluations(self) -> Dict[str, List[str]]:
        """variant -> the runtimes it is measured on."""
        return {b.name: list(b.runtimes) for b in self.builds}

    def names(self) -> List[str]:
        return [e for b in self.builds for e in b.evaluations()]


def variant_plan(cfg: RunConfig) -> Plan:
    v = cfg.variants
    notes: List[str] = []
    shrinks: List[ShrinkSpec] = []
    for base in v.bases:
        shrinks.append(ShrinkSpec(base))
        if not v.shrink and v.search is None:
            continue
        if base == "teacher" and cfg.teacher.onnx is not None:
            techniques = v.search.shrink if v.search is not None else v.shrink
            notes.append(f"structural techniques ({', '.join(techniques)}) shrink the teacher's torch conversion "
                         f"(onnx2torch), checked against {cfg.teacher.onnx.name} on validation images first")
        if v.search is not None:
            shrinks += [ShrinkSpec(base, tag=f"s{k}", slot=k) for k in range(1, v.search.survivors + 1)]
            continue
        from edgeopt.shrink.base import get

        for name, opts in v.shrink.items():
            t = get(name)
            shrinks += [ShrinkSpec(base, name, a, t.variant_tag(a)) for a in opts.amounts]
    builds = [
        BuildSpec(s, f, p, tuple(rt for rt in formats.get(f).runtimes if rt in v.runtimes))
        for s in shrinks for f in v.formats for p in v.quantization if f in precisions.formats_for(p)
    ]
    builds = [b for b in builds if b.runtimes]
    ref_runtime = formats.get(REFERENCE_FORMAT).native_runtime
    reference = next((b for b in builds if b.shrink == ShrinkSpec("teacher") and b.format == REFERENCE_FORMAT
                      and b.precision == REFERENCE_PRECISION), None)
    if reference is None:  # the teacher is not a base here: it is measured as the reference only
        reference = BuildSpec(ShrinkSpec("teacher"), REFERENCE_FORMAT, REFERENCE_PRECISION, (ref_runtime,))
        builds.insert(0, reference)
        if reference.shrink not in shrinks:
            shrinks.insert(0, reference.shrink)
    elif ref_runtime not in reference.runtimes:
        builds[builds.index(reference)] = reference = BuildSpec(
            reference.shrink, REFERENCE_FORMAT, REFERENCE_PRECISION, (ref_runtime, *reference.runtimes))
    workers = []
    if v.search is not None:
        workers = [f"search_worker_{i}" for i in range(v.search.workers)]
        notes.append(f"search: an Optuna study ({v.search.sampler}, budget {v.search.budget.model_dump()}) over "
                     f"{', '.join(v.search.shrink)}; its {v.search.survivors} best per base become the <base>-s<n> "
                     f"variants (technique and amount decided at run time)")
    return Plan(shrinks=shrinks, builds=builds, reference=reference, notes=notes, search_workers=workers)
