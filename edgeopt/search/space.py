"""What a trial is and how it is judged: the candidate a trial suggests (base, technique, amount, the
options chosen), and the rules that stop it or score it. Plain logic: no optuna, torch or runtime import.

Rules, in the order a trial meets them (docs/search.md):

1. a **constraint breaker** (``max_latency_ms``, ``max_size_mb``) on every precision/format/runtime of its
   base is rejected before any fine-tune;
2. a **dominated** candidate is rejected before any fine-tune: another candidate of the same family (base,
   technique, options) that keeps more of the model is as good at what the search optimizes on every
   combination where this one is feasible (as fast within the measured noise; or, where accuracy is what
   is optimized, feasible too: more pruning than that only loses accuracy);
3. the rest get short KD fine-tunes, scored after each rung (successive halving stops the worst);
4. the survivors (:func:`edgeopt.search.outcome.survivors`) get the full fine-tune in the pipeline.

The search optimizes what selection will: the ``selection.objective`` among variants within the
accuracy budget, or, where a latency or size target binds (the unpruned base breaks it somewhere), the
least compression that meets the target, per base and runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from edgeopt.config import RunConfig
from edgeopt.config.schema import SearchRange

AMOUNT_DIGITS = 6  # amounts are rounded to this many decimals (the step lattice without float residue)
SPEED_BUCKET = 1.05  # latency scores move in steps of 5 %: a p50 that moves within its noise rarely changes one
FEASIBLE = 100.0  # a feasible candidate scores this plus or minus its merit (always > 0); any other, below 0


@dataclass(frozen=True)
class Candidate:
    """One structural candidate: a technique at an amount on a base, with the options the trial chose."""

    base: str
    technique: str
    amount: float
    choices: Tuple[Tuple[str, Any], ...] = ()

    @property
    def family(self) -> Tuple[str, str, Tuple[Tuple[str, Any], ...]]:
        """Candidates of one family differ only in the amount: more of it keeps less of the model."""
        return self.base, self.technique, self.choices

    @property
    def label(self) -> str:
        chosen = "".join(f", {k}={v}" for k, v in self.choices)
        return f"{self.base} {self.technique} {self.amount:g}{chosen}"

    def options(self, space: Dict[str, SearchRange]) -> Any:
        """The technique's options for this candidate: the configured ones, the trial's choices, its amount."""
        return space[self.technique].options.model_copy(update={**dict(self.choices), "amounts": [self.amount]})

    def spec(self, space: Dict[str, SearchRange]) -> Dict[str, Any]:
        """What the pipeline's fine-tune of a survivor takes (JSON)."""
        return {"base": self.base, "technique": self.technique, "amount": self.amount,
                "choices": dict(self.choices), "options": self.options(space).model_dump(mode="json")}


def lattice(r: SearchRange) -> Tuple[float, float, float]:
    """(lo, the highest amount on the step lattice within the range, step)."""
    lo, hi = r.range
    n = math.floor((hi - lo) / r.step + 1e-9)
    return lo, round(lo + n * r.step, AMOUNT_DIGITS), r.step


def snap(amount: float, r: SearchRange) -> float:
    """The lattice amount nearest ``amount``, within the range."""
    lo, top, step = lattice(r)
    return round(min(top, max(lo, lo + round((amount - lo) / step) * step)), AMOUNT_DIGITS)


def suggest(trial: Any, bases: Sequence[str], space: Dict[str, SearchRange]) -> Candidate:
    """The candidate an Optuna trial asks for. Parameter names: ``base``, ``technique``,
    ``<technique>.amount`` and ``<technique>.<option>`` (a single choice is no parameter)."""
    base = trial.suggest_categorical("base", list(bases)) if len(bases) > 1 else bases[0]
    technique = trial.suggest_categorical("technique", list(space)) if len(space) > 1 else next(iter(space))
    r = space[technique]
    lo, top, step = lattice(r)
    amount = lo if top <= lo else trial.suggest_float(f"{technique}.amount", lo, top, step=step)
    choices = tuple(sorted(
        (option, trial.suggest_categorical(f"{technique}.{option}", values) if len(values) > 1 else values[0])
        for option, values in r.choices.items()))
    return Candidate(base, technique, round(amount, AMOUNT_DIGITS), choices)


def grid_params(cfg: RunConfig) -> List[Dict[str, Any]]:
    """The trials a search starts from: every amount of ``variants.shrink`` for a technique it searches,
    on every base, snapped to the search's lattice, with the configured options where they are choices."""
    assert cfg.variants.search is not None
    space, bases = cfg.variants.search.shrink, cfg.variants.bases
    out = []
    for technique, grid in cfg.variants.shrink.items():
        if technique not in space:
            continue
        r = space[technique]
        for base in bases:
            for amount in grid.amounts:
                params: Dict[str, Any] = {}
                if len(bases) > 1:
                    params["base"] = base
                if len(space) > 1:
                    params["technique"] = technique
                if lattice(r)[1] > lattice(r)[0]:
                    params[f"{technique}.amount"] = snap(amount, r)
                for option, values in r.choices.items():
                    if len(values) > 1:
                        own = getattr(grid, option, values[0])
                        params[f"{technique}.{option}"] = own if own in values else values[0]
                if params not in out:
                    out.append(params)
    return out


@dataclass
class Combo:
    """A candidate measured on one precision/format/runtime, in the same loop as the unpruned base."""

    p50_ms: float
    size_mb: float
    noise_pct: float
    base_p50_ms: float  # the unpruned base, same combination, same loop

    @property
    def speed(self) -> float:
        """Same-run speedup over the unpruned base on this combination."""
        return self.base_p50_ms / self.p50_ms


@dataclass
class Probe:
    """What the cheap stage found: size, MACs and, per combination, latency; the base's reference
    combination's p50 from the same loop (every latency score is a same-run ratio to it)."""

    params: int
    macs: int
    combos: Dict[str, Combo]
    base_ref_p50_ms: float
    base_size_mb: float
    signature: str = ""  # the shapes of every tensor: two candidates with one signature are one model
    failed: Dict[str, str] = field(default_factory=dict)  # combination -> why it did not build or run


@dataclass(frozen=True)
class Judge:
    """The rules, from the run's constraints and objective; ``by_accuracy``: the search looks for the
    least compression (a binding latency/size target, or the accuracy objective)."""

    max_latency_ms: Optional[float]
    max_size_mb: Optional[float]
    max_drop: Optional[float]
    objective: str
    by_accuracy: bool
    slack: float = 0.0

    @classmethod
    def of(cls, cfg: RunConfig, binding: bool) -> "Judge":
        c, s = cfg.target.constraints, cfg.variants.search
        assert s is not None
        return cls(c.max_latency_ms, c.max_size_mb, c.max_accuracy_drop, cfg.selection.objective,
                   binding or cfg.selection.objective == "accuracy", s.accuracy_slack)

    def meets(self, c: Combo) -> bool:
        """Within the latency (allowing its measured noise) and size targets."""
        return ((self.max_latency_ms is None or c.p50_ms <= self.max_latency_ms * (1 + c.noise_pct / 100))
                and (self.max_size_mb is None or c.size_mb <= self.max_size_mb))

    def binds(self, base_combos: Dict[str, Combo]) -> bool:
        """Whether a target is set that the unpruned base breaks on some combination."""
        return any(not self.meets(c) for c in base_combos.values())

    def feasible(self, probe: Probe) -> List[str]:
        return [k for k, c in probe.combos.items() if self.meets(c)]

    def breaks(self, probe: Probe) -> Optional[str]:
        """Why no combination meets the targets, or None."""
        if not probe.combos:
            return "no precision/format/runtime built: " + "; ".join(f"{k}: {v}" for k, v in probe.failed.items())
        if self.feasible(probe):
            return None
        fastest = min(probe.combos.values(), key=lambda c: c.p50_ms)
        smallest = min(c.size_mb for c in probe.combos.values())
        why = []
        if self.max_latency_ms is not None and fastest.p50_ms > self.max_latency_ms:
            why.append(f"best p50 {fastest.p50_ms:.4g} ms > {self.max_latency_ms:g} ms")
        if self.max_size_mb is not None and smallest > self.max_size_mb:
            why.append(f"smallest {smallest:.4g} MB > {self.max_size_mb:g} MB")
        return f"breaks the target on every one of its {len(probe.combos)} combinations ({', '.join(why)})"

    def excess(self, probe: Probe) -> float:
        """How far the closest combination is beyond the targets (a fraction), for ranking breakers."""
        def over(c: Combo) -> float:
            lat = c.p50_ms / self.max_latency_ms - 1 if self.max_latency_ms else 0.0
            size = c.size_mb / self.max_size_mb - 1 if self.max_size_mb else 0.0
            return max(lat, size, 0.0)
        return min((over(c) for c in probe.combos.values()), default=1.0)

    def dominates(self, a: Probe, b: Probe) -> bool:
        """``a`` (keeping more of the model: more accurate, as a prior) is at least as good as ``b`` at what
        the search optimizes on every combination where ``b`` is feasible."""
        if a.params <= b.params:
            return False
        for k in self.feasible(b):
            if k not in a.combos or not self.meets(a.combos[k]):
                return False
            if self.by_accuracy:
                continue
            ca, cb = a.combos[k], b.combos[k]
            if self.objective == "size" and ca.size_mb > cb.size_mb:
                return False
            tolerance = max(ca.noise_pct, cb.noise_pct) / 100
            if self.objective == "latency" and ca.speed < cb.speed * (1 - tolerance):
                return False
        return True

    def score(self, probe: Probe, drop: float) -> float:
        """The trial's value (higher is better) after a fine-tune whose accuracy is ``drop`` points below
        the reference: positive within the accuracy budget (plus the slack a short fine-tune gets), around
        FEASIBLE and the higher the better at the objective; negative by the points beyond it."""
        if self.by_accuracy:
            return FEASIBLE - drop
        budget = (self.max_drop if self.max_drop is not None else math.inf) + self.slack
        if drop > budget:
            return -(drop - budget)
        feasible = [probe.combos[k] for k in self.feasible(probe)]
        if self.objective == "size":
            return FEASIBLE + math.log2(probe.base_size_mb / min(c.size_mb for c in feasible))
        speed = probe.base_ref_p50_ms / min(c.p50_ms for c in feasible)
        return FEASIBLE + round(math.log(speed) / math.log(SPEED_BUCKET))
